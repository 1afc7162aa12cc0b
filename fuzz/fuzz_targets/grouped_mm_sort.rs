//! `grouped_mm_sort` with arbitrary indices (any int32, so negative, -1 masked, beyond the
//! experts), weights, token mask, numLocalExperts and expertsStartIdx. Ok or a typed Err;
//! on Ok the slots are grouped by local expert, stable, and the offsets are the running sums.
#![no_main]
use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use moe_core::grouped::grouped_mm_sort;
use moe_core::{DType, Data, TensorRef};

fn run(u: &mut Unstructured) -> arbitrary::Result<()> {
    let t = u.int_in_range(0..=10usize)?;
    let k = u.int_in_range(0..=4usize)?;
    let indices: Vec<i32> = (0..t * k)
        .map(|_| Ok(if u.arbitrary::<bool>()? { u.int_in_range(-2..=9)? } else { u.arbitrary()? }))
        .collect::<arbitrary::Result<_>>()?;
    let weights: Vec<f32> = (0..t * k).map(|i| i as f32).collect();
    let mask: Vec<u8> = (0..t).map(|_| u.int_in_range(0..=1u8)).collect::<Result<_, _>>()?;
    let num_local = if u.arbitrary::<bool>()? { u.int_in_range(0..=8usize)? } else { u.arbitrary::<u16>()? as usize }; // larger counts are valid but allocate that many outputs
    let start = if u.arbitrary::<bool>()? { u.int_in_range(0..=8usize)? } else { u.arbitrary::<u64>()? as usize };
    let use_mask: bool = u.arbitrary()?;
    let idx_t = TensorRef::of("indices", vec![t, k], &indices).unwrap();
    let w_t = TensorRef::of("weights", vec![t, k], &weights).unwrap();
    let m_t = TensorRef::new("tokenMask", DType::Bool, vec![t], &mask).unwrap();
    if let Ok(r) = grouped_mm_sort(&idx_t, &w_t, use_mask.then_some(&m_t), num_local, start) {
        let (Data::I32(slots), Data::I32(per), Data::I32(offs)) = (&r.sorted_slot_ids.data, &r.tokens_per_expert.data, &r.offsets.data)
        else {
            panic!()
        };
        assert_eq!(per.len(), num_local);
        let mut acc = 0;
        for (c, o) in per.iter().zip(offs) {
            acc += c;
            assert_eq!(*o, acc);
        }
        assert_eq!(acc as usize, slots.len());
        let mut at = 0;
        for (l, &c) in per.iter().enumerate() {
            let block = &slots[at..at + c as usize];
            assert!(block.windows(2).all(|w| w[0] < w[1]), "expert {l}: slots not stable");
            for &s in block {
                assert_eq!(indices[s as usize] as i64, start as i64 + l as i64);
            }
            at += c as usize;
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
