//! `exp` and `ln` in f64 written with `+ - * /`, `floor` and bit operations only, so that every
//! build computes the same bits: the native addon would otherwise call glibc's libm (which
//! picks FMA variants at run time) and the wasm module Rust's libm port, and the two may
//! differ in the last bit. Both functions are within a few ulps of the true value, far below
//! what an f32 result can show; they are the only transcendental functions the routing and
//! aux-loss ops use (`sqrt` is correctly rounded everywhere and needs no replacement).

/// ln(2) split so that `k * LN2_HI` is exact for |k| < 2^11.
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000); // 6.93147180369123816490e-01
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76); // 1.90821492927058770002e-10
const LOG2_E: f64 = std::f64::consts::LOG2_E;

/// 2^k for any integer k (two steps where 2^k alone is not a normal f64).
fn scale(x: f64, k: i64) -> f64 {
    let pow2 = |e: i64| f64::from_bits(((e + 1023) as u64) << 52);
    if k > 1023 {
        x * pow2(1023) * pow2((k - 1023).min(1023))
    } else if k < -1022 {
        x * pow2(-1022) * pow2((k + 1022).max(-1022))
    } else {
        x * pow2(k)
    }
}

/// e^x.
pub(crate) fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.782_712_893_384 {
        return f64::INFINITY;
    }
    if x < -745.2 {
        return 0.0;
    }
    // x = k ln2 + r with |r| <= ln2 / 2 (plus rounding).
    let k = (x * LOG2_E + 0.5).floor();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // Taylor series to r^14/14! (Horner): the truncation error is below 2^-60 for |r| <= 0.35.
    let mut p = INV_FACTORIAL[14];
    for c in INV_FACTORIAL[..14].iter().rev() {
        p = p * r + c;
    }
    scale(p, k as i64)
}

/// 1/n! for n = 0..=14 (each n! is an integer below 2^53, so each entry is one rounding).
const INV_FACTORIAL: [f64; 15] = [
    1.0,
    1.0,
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5_040.0,
    1.0 / 40_320.0,
    1.0 / 362_880.0,
    1.0 / 3_628_800.0,
    1.0 / 39_916_800.0,
    1.0 / 479_001_600.0,
    1.0 / 6_227_020_800.0,
    1.0 / 87_178_291_200.0,
];

/// The natural logarithm: -inf at 0, NaN below 0 and for NaN.
pub(crate) fn ln(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x == f64::INFINITY {
        return x;
    }
    let (mut x, mut e) = (x, 0i64);
    if x < f64::MIN_POSITIVE {
        x *= 18_014_398_509_481_984.0; // 2^54: subnormals become normal
        e -= 54;
    }
    let bits = x.to_bits();
    e += ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000); // [1, 2)
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln m = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.1716: the odd series to s^23
    // leaves a truncation error below 2^-60.
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let mut poly = 1.0 / 23.0;
    for d in (1..=10).rev() {
        poly = poly * z + 1.0 / (2 * d + 1) as f64;
    }
    let ln_m = 2.0 * s + 2.0 * s * z * poly;
    let ef = e as f64;
    ef * LN2_HI + (ef * LN2_LO + ln_m)
}

/// ln(1 + y) for y >= 0, accurate also when y is tiny.
pub(crate) fn ln_1p(y: f64) -> f64 {
    let u = 1.0 + y;
    if u == 1.0 {
        y
    } else {
        ln(u) * (y / (u - 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f64, b: f64) -> u64 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
    }

    #[test]
    fn exp_is_within_a_few_ulps_of_std() {
        let mut worst = 0;
        let mut x = -744.0;
        while x < 709.0 {
            let (ours, theirs) = (exp(x), x.exp());
            if theirs > 1e-300 {
                worst = worst.max(ulps(ours, theirs));
            }
            x += 0.013_7;
        }
        assert!(worst <= 4, "worst {worst} ulps");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(1000.0), f64::INFINITY);
        assert_eq!(exp(-1000.0), 0.0);
        assert!(exp(f64::NAN).is_nan());
        assert_eq!(exp(f64::NEG_INFINITY), 0.0);
    }

    #[test]
    fn ln_is_within_a_few_ulps_of_std() {
        let mut worst = 0;
        for i in 0..200_000u64 {
            let x = f64::from_bits(1 + i.wrapping_mul(0x0000_5a5a_5a5a_5a5a) % 0x7fef_ffff_ffff_ffff);
            worst = worst.max(ulps(ln(x), x.ln()));
        }
        for x in [0.5, 0.75, 0.999_999, 1.0, 1.000_001, 1.5, 2.0, 10.0, 1e-300, 5e-324, f64::MAX] {
            worst = worst.max(ulps(ln(x), x.ln()));
        }
        assert!(worst <= 4, "worst {worst} ulps");
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
        assert!(ln(-1.0).is_nan());
    }

    #[test]
    fn ln_1p_keeps_tiny_arguments() {
        for y in [1e-30, 1e-17, 1e-10, 1e-5, 0.1, 1.0, 1e10] {
            let rel = (ln_1p(y) - y.ln_1p()).abs() / y.ln_1p();
            assert!(rel < 1e-15, "{y}: {rel}");
        }
    }
}
