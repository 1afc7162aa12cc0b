//! Safetensors parsing (crates/moe-core/src/checkpoint.rs and checkpoint/) on arbitrary bytes:
//! the header reader, the full loader, checkpointInfo and the per-rank expert loader in every
//! key scheme, on one file or on a sharded checkpoint (an index json and its shards). Ok or a
//! typed Err, never a panic; a loaded tensor's bytes always match its dtype and shape.
//!
//! The first byte picks the mode. Single file: the rest is the file, or (odd modes) a valid
//! 8-byte length in front of the fuzzer's bytes, so the JSON parser and the entry checks see
//! input, not only the length check. Sharded: the rest up to the first zero byte is the index
//! json; after it, one framed shard that every shard name opens to, except names containing
//! 'b' (absent, as an in-memory shard left out).
#![no_main]
use libfuzzer_sys::fuzz_target;
use moe_core::activations::ActivationKind;
use moe_core::checkpoint::{load, load_experts, read_header, ByteSource, Checkpoint, ExpertFormat, Loaded, Opener, SliceSource};
use moe_core::Error;

fn framed(body: &[u8]) -> Vec<u8> {
    let header_len = body.iter().position(|&b| b == 0).unwrap_or(body.len()) as u64;
    let mut v = header_len.to_le_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn check_loaded(tensors: &[(String, Loaded)]) {
    for (name, t) in tensors {
        match t {
            Loaded::Tensor(t) => assert_eq!(t.data.len(), t.shape.iter().product::<usize>(), "tensor {name}"),
            Loaded::Int64 { shape, bytes } => assert_eq!(bytes.len(), 8 * shape.iter().product::<usize>(), "tensor {name}"),
        }
    }
}

fn typed(e: &Error) {
    assert!(!matches!(e, Error::Internal(_)), "internal error: {e}");
}

fn experts<'a>(mk: &mut dyn FnMut() -> Option<Checkpoint<'a>>) {
    let formats = [
        None,
        Some(ExpertFormat::Hf),
        Some(ExpertFormat::Mixtral),
        Some(ExpertFormat::GptOss),
        Some(ExpertFormat::HfFused),
        Some(ExpertFormat::Stacked),
    ];
    for (n, (experts, ep, rank)) in [(2usize, 1usize, 0usize), (4, 2, 1), (1, 1, 0)].into_iter().enumerate() {
        for kind in [ActivationKind::Swiglu, ActivationKind::Relu2, ActivationKind::QuickGeglu] {
            let Some(mut ck) = mk() else { return };
            if let Err(e) = load_experts(&mut ck, "experts", experts, ep, rank, kind, formats[(n * 3 + kind as usize) % formats.len()]) {
                typed(&e);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mode = data.first().copied().unwrap_or(0);
    let body = data.get(1..).unwrap_or(&[]);
    if mode % 3 != 2 {
        let owned;
        let bytes: &[u8] = if mode & 1 == 1 {
            owned = framed(body);
            &owned
        } else {
            body
        };
        if let Err(e) = read_header(&mut SliceSource::new(bytes)) {
            typed(&e);
        }
        match load(&mut SliceSource::new(bytes), None) {
            Ok(tensors) => check_loaded(&tensors),
            Err(e) => typed(&e),
        }
        experts(&mut || Checkpoint::single("f", Box::new(SliceSource::new(bytes))).ok());
    } else {
        let split = body.iter().position(|&b| b == 0).unwrap_or(body.len());
        let index = &body[..split];
        let owned = framed(body.get(split + 1..).unwrap_or(&[]));
        let shard: &[u8] = &owned;
        let opener = || -> Opener<'_> {
            Box::new(move |name: &str| {
                Ok(if name.contains('b') { None } else { Some(Box::new(SliceSource::new(shard)) as Box<dyn ByteSource + '_>) })
            })
        };
        let Ok(mut ck) = Checkpoint::sharded(index, opener()) else { return };
        let names: Vec<String> = ck.names().take(3).map(str::to_string).collect();
        match ck.load(Some(&names)) {
            Ok(tensors) => check_loaded(&tensors),
            Err(e) => typed(&e),
        }
        if let Err(e) = ck.info() {
            typed(&e);
        }
        experts(&mut || Checkpoint::sharded(index, opener()).ok());
    }
});
