//! Safetensors parsing (crates/moe-core/src/checkpoint.rs) on arbitrary bytes: the header
//! reader, the full loader and the per-rank expert loader. Ok or a typed Err, never a panic;
//! a loaded tensor's bytes always match its dtype and shape.
//! Half of the inputs are a valid 8-byte length in front of the fuzzer's bytes, so the JSON
//! parser and the entry checks see input, not only the length check.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moe_core::activations::ActivationKind;
use moe_core::checkpoint::{load, load_experts, read_header, SliceSource};

fuzz_target!(|data: &[u8]| {
    let framed;
    let bytes: &[u8] = if data.first().is_some_and(|b| b & 1 == 1) {
        let body = &data[1..];
        let header_len = body.iter().position(|&b| b == 0).unwrap_or(body.len()) as u64;
        let mut v = header_len.to_le_bytes().to_vec();
        v.extend_from_slice(body);
        framed = v;
        &framed
    } else {
        data
    };
    let _ = read_header(&mut SliceSource::new(bytes));
    if let Ok(tensors) = load(&mut SliceSource::new(bytes), None) {
        for (name, t) in &tensors {
            let numel: usize = t.shape.iter().product();
            assert_eq!(t.data.len(), numel, "tensor {name}");
        }
    }
    for (experts, ep, rank) in [(2usize, 1usize, 0usize), (4, 2, 1), (1, 1, 0)] {
        for kind in [ActivationKind::Swiglu, ActivationKind::Relu2] {
            let _ = load_experts(&mut SliceSource::new(bytes), "experts", experts, ep, rank, kind);
        }
    }
});
