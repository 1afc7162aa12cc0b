//! Chunk sort (Megatron-Core `sort_chunks_by_idxs`): split the rows of a tensor into
//! consecutive chunks of given sizes and emit the chunks in a given order. A pure copy, so it
//! is bit-exact in every dtype; its backward is the same copy with the inverse order.

use std::borrow::Cow;

use crate::alloc::{filled_vec, write_slice};
use crate::error::{Error, Result};
use crate::par::for_each_row;
use crate::tensor::{DType, Meta, Tensor, TensorRef};

/// Output of [`sort_chunks_by_index`] and [`sort_chunks_by_index_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct SortedChunks {
    /// `[N, H]`, the dtype of the input: the chunks in the new order.
    pub output: Tensor,
    /// `[N]` f32, when probs were given: they move with their rows.
    pub probs: Option<Tensor>,
}

/// Checked chunk layout: `starts[c]` is the first row of chunk `c` in the unsorted tensor.
struct Chunks {
    sizes: Vec<usize>,
    starts: Vec<usize>,
    order: Vec<usize>,
}

/// The chunk layout from the sizes and the order (checked by [`check_sort_chunks`] but their values).
fn chunks(split_sizes: &TensorRef, sorted_idxs: &TensorRef, num_rows: usize, rows_of: &str) -> Result<Chunks> {
    let c = split_sizes.shape[0];
    let raw_sizes = split_sizes.indices()?;
    let mut sizes = Vec::with_capacity(c);
    let mut starts = Vec::with_capacity(c);
    let mut total: u64 = 0;
    for (i, &s) in raw_sizes.iter().enumerate() {
        if s < 0 {
            return Err(Error::range("splitSizes", format!("splitSizes[{i}] = {s} is negative")));
        }
        starts.push(total as usize);
        total = total.saturating_add(s as u64);
        sizes.push(s as usize);
    }
    if total != num_rows as u64 {
        return Err(Error::range("splitSizes", format!("the sizes add up to {total}, but {rows_of} has {num_rows} rows")));
    }
    let idx = sorted_idxs.indices()?;
    let mut seen = vec![false; c];
    let mut order = Vec::with_capacity(c);
    for (j, &i) in idx.iter().enumerate() {
        if i < 0 || i as u64 >= c as u64 {
            return Err(Error::range("sortedIdxs", format!("sortedIdxs[{j}] = {i} is outside [0, numChunks = {c})")));
        }
        if std::mem::replace(&mut seen[i as usize], true) {
            return Err(Error::range("sortedIdxs", format!("chunk {i} is listed twice (sortedIdxs must be a permutation of 0..{c})")));
        }
        order.push(i as usize);
    }
    Ok(Chunks { sizes, starts, order })
}

impl Chunks {
    /// Source row of every output row when the chunks are emitted in `order`.
    fn forward_rows(&self) -> Vec<usize> {
        let mut rows = Vec::with_capacity(self.sizes.iter().sum());
        for &c in &self.order {
            rows.extend(self.starts[c]..self.starts[c] + self.sizes[c]);
        }
        rows
    }

    /// Source row (in the sorted layout) of every row of the unsorted layout: the adjoint.
    fn backward_rows(&self) -> Vec<usize> {
        let mut sorted_start = vec![0usize; self.sizes.len()];
        let mut at = 0;
        for &c in &self.order {
            sorted_start[c] = at;
            at += self.sizes[c];
        }
        let mut rows = Vec::with_capacity(at);
        for (c, &size) in self.sizes.iter().enumerate() {
            rows.extend(sorted_start[c]..sorted_start[c] + size);
        }
        rows
    }
}

fn gather<T: Copy + Send + Sync>(src: &[T], hidden: usize, rows: &[usize]) -> Vec<T> {
    let work = 2 * rows.len() * hidden * std::mem::size_of::<T>();
    filled_vec(rows.len() * hidden, |out| {
        for_each_row(
            out,
            hidden,
            work,
            || (),
            |_, i, row| {
                let r = rows[i];
                write_slice(row, &src[r * hidden..(r + 1) * hidden]);
            },
        )
    })
}

fn apply(input: &TensorRef, probs: Option<&TensorRef>, rows: &[usize]) -> Result<SortedChunks> {
    let hidden = input.shape[1];
    let shape = vec![rows.len(), hidden];
    // A copy: rows move as raw bits, so every dtype (and every NaN payload) is exact.
    let output = match input.dtype {
        DType::F32 => Tensor::f32(shape, gather(&input.raw::<f32>(), hidden, rows)),
        DType::BF16 | DType::F16 => Tensor::u16(input.dtype, shape, gather(&input.raw::<u16>(), hidden, rows)),
        other => return Err(Error::Internal(format!("chunk sort of {} passed the dtype check", other.name()))),
    };
    let probs = match probs {
        Some(p) => {
            let src: Cow<[f32]> = p.typed::<f32>()?;
            Some(Tensor::f32(vec![rows.len()], rows.iter().map(|&r| src[r]).collect()))
        }
        None => None,
    };
    Ok(SortedChunks { output, probs })
}

/// Every check of [`sort_chunks_by_index`] (`backward`: of [`sort_chunks_by_index_backward`],
/// `x` its gradOutput) on dtypes and shapes, in its order; the values of the sizes and the order
/// are checked by the op: `(numRows, numChunks)`.
pub fn check_sort_chunks(x: Meta, split_sizes: Meta, sorted_idxs: Meta, probs: Option<Meta>, backward: bool) -> Result<(usize, usize)> {
    let n = x.expect_rank(2, "[numRows, hidden]")?[0];
    x.expect_dtype(DType::TOKENS)?;
    if let Some(p) = probs {
        p.expect_dtype(&[DType::F32])?;
        p.expect_shape(&[n], if backward { "([numRows], one per row of gradOutput)" } else { "([numRows], one per row of input)" })?;
    }
    let c = split_sizes.expect_rank(1, "[numChunks]")?[0];
    split_sizes.expect_dtype(DType::INDICES)?;
    sorted_idxs.expect_dtype(DType::INDICES)?;
    sorted_idxs.expect_shape(&[c], "([numChunks], the length of splitSizes)")?;
    Ok((n, c))
}

/// Either sort: `x` by `sizes` into `order` (`backward`: its adjoint), `probs` moving with the rows.
fn sort(x: &TensorRef, sizes: &TensorRef, order: &TensorRef, probs: Option<&TensorRef>, backward: bool) -> Result<SortedChunks> {
    let (n, _) = check_sort_chunks(x.meta(), sizes.meta(), order.meta(), probs.map(|p| p.meta()), backward)?;
    let layout = chunks(sizes, order, n, if backward { "gradOutput" } else { "input" })?;
    apply(x, probs, &if backward { layout.backward_rows() } else { layout.forward_rows() })
}

/// Splits `input [N, H]` into consecutive chunks of `splitSizes [C]` rows and outputs chunk
/// `sortedIdxs[0]`, then `sortedIdxs[1]`, ... `sortedIdxs` must be a permutation of
/// `0..C` and the sizes must add up to `N`. `probs [N]` move with their rows.
pub fn sort_chunks_by_index(
    input: &TensorRef,
    split_sizes: &TensorRef,
    sorted_idxs: &TensorRef,
    probs: Option<&TensorRef>,
) -> Result<SortedChunks> {
    sort(input, split_sizes, sorted_idxs, probs, false)
}

/// Backward of [`sort_chunks_by_index`] (the same arguments, the gradient of its outputs):
/// chunk `sortedIdxs[j]` of the gradient input is chunk `j` of `gradOutput`, a pure copy.
/// `splitSizes` are the sizes of the chunks in the original (unsorted) order, as in forward.
pub fn sort_chunks_by_index_backward(
    grad_output: &TensorRef,
    split_sizes: &TensorRef,
    sorted_idxs: &TensorRef,
    grad_probs: Option<&TensorRef>,
) -> Result<SortedChunks> {
    sort(grad_output, split_sizes, sorted_idxs, grad_probs, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::tensor::Data;
    use half::bf16;

    #[test]
    fn sorts_chunks_and_probs_and_backward_restores_them() {
        // 5 rows of width 2 in chunks [2, 0, 3]; order [2, 0, 1].
        let x: Vec<f32> = (0..10).map(|v| v as f32).collect();
        let p: Vec<f32> = vec![0.0, 0.1, 0.2, 0.3, 0.4];
        let sizes = [2i64, 0, 3];
        let order = [2i32, 0, 1];
        let xr = TensorRef::of("input", vec![5, 2], &x).unwrap();
        let pr = TensorRef::of("probs", vec![5], &p).unwrap();
        let sr = TensorRef::of("splitSizes", vec![3], &sizes[..]).unwrap();
        let or = TensorRef::of("sortedIdxs", vec![3], &order[..]).unwrap();
        let out = sort_chunks_by_index(&xr, &sr, &or, Some(&pr)).unwrap();
        assert_eq!(out.output.data, Data::F32(vec![4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 0.0, 1.0, 2.0, 3.0]));
        assert_eq!(out.probs.as_ref().unwrap().data, Data::F32(vec![0.2, 0.3, 0.4, 0.0, 0.1]));

        let Data::F32(sorted) = &out.output.data else { unreachable!() };
        let gr = TensorRef::of("gradOutput", vec![5, 2], sorted).unwrap();
        let Data::F32(sp) = &out.probs.as_ref().unwrap().data else { unreachable!() };
        let gp = TensorRef::of("gradProbs", vec![5], sp).unwrap();
        let back = sort_chunks_by_index_backward(&gr, &sr, &or, Some(&gp)).unwrap();
        assert_eq!(back.output.data, Data::F32(x.clone()));
        assert_eq!(back.probs.unwrap().data, Data::F32(p));
    }

    #[test]
    fn copies_bf16_bits_exactly() {
        let x: Vec<bf16> = [0x7fc1u16, 0x8000, 0x0001, 0xff80].iter().map(|&b| bf16::from_bits(b)).collect();
        let xr = TensorRef::of("input", vec![4, 1], &x).unwrap();
        let sizes = [1i32, 3];
        let order = [1i32, 0];
        let out = sort_chunks_by_index(
            &xr,
            &TensorRef::of("splitSizes", vec![2], &sizes[..]).unwrap(),
            &TensorRef::of("sortedIdxs", vec![2], &order[..]).unwrap(),
            None,
        )
        .unwrap();
        assert_eq!(out.output.dtype, DType::BF16);
        assert_eq!(out.output.data, Data::U16(vec![0x8000, 0x0001, 0xff80, 0x7fc1]));
        assert!(out.probs.is_none());
    }

    #[test]
    fn rejects_bad_sizes_and_orders() {
        let x = vec![0f32; 4];
        let xr = TensorRef::of("input", vec![4, 1], &x).unwrap();
        let run = |sizes: &[i32], order: &[i32]| {
            let s = TensorRef::of("splitSizes", vec![sizes.len()], sizes).unwrap();
            let o = TensorRef::of("sortedIdxs", vec![order.len()], order).unwrap();
            sort_chunks_by_index(&xr, &s, &o, None).unwrap_err()
        };
        let err = run(&[1, 2], &[0, 1]);
        assert_eq!(err.kind(), ErrorKind::RangeError);
        assert!(err.to_string().starts_with("splitSizes: the sizes add up to 3, but input has 4 rows"), "{err}");
        assert!(run(&[5, -1], &[0, 1]).to_string().starts_with("splitSizes: splitSizes[1] = -1"));
        assert!(run(&[2, 2], &[1, 1]).to_string().starts_with("sortedIdxs: chunk 1 is listed twice"));
        assert!(run(&[2, 2], &[0, 2]).to_string().starts_with("sortedIdxs: sortedIdxs[1] = 2 is outside"));
        assert!(run(&[2, 2], &[0]).to_string().starts_with("sortedIdxs.shape:"));
    }
}
