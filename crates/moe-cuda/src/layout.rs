//! Layout ops on device tensors (kernels/layout.cu): indices <-> multihot, tokensPerExpert,
//! padRoutingMap, dropTokens, the chunk sort and its backward, and groupedMmSort. Inputs and
//! outputs stay on the GPU, and results are the CPU core's bit for bit (the core is the
//! reference: crates/moe-core/src/{routing_map,capacity,chunks,grouped}.rs).
//!
//! As in device_ops.rs, arguments are checked by the op's check function in the core
//! (`check_indices_to_multihot`, `check_multihot_to_indices`, `check_tokens_per_expert`,
//! `check_pad_routing_map`, `check_drop_tokens`, `check_sort_chunks`, `check_grouped_mm_sort`)
//! on the tensors' `Meta`, which also gives the sizes (and dropTokens' capacity); when a check fails, or a kernel reports an invalid value through its error word (an
//! index out of range, an expert listed twice), or the GPU path has a limit the core does not
//! (sizes beyond int32), the op runs its host path: it downloads the inputs and calls the core
//! function, whose error (same class, same message) or result (uploaded) it returns. Bool
//! tensors on the GPU are not rechecked for 0/1 (nonzero is true).
//!
//! Synchronisations (small reads): indicesToMultihot reads its error word (4 bytes),
//! multihotToIndices the widest row (4 bytes), sortChunksByIndex reads splitSizes and
//! sortedIdxs (4 bytes a chunk) to check them, groupedMmSort its error word and slot count.
//! tokensPerExpert, padRoutingMap and dropTokens do not synchronise.

use moe_core::capacity::{check_drop_tokens, check_pad_routing_map, check_tokens_per_expert, DropCheck, DropOptions, DropPolicy};
use moe_core::chunks::check_sort_chunks;
use moe_core::grouped::{check_grouped_mm_sort, GroupedCheck};
use moe_core::routing_map::{check_indices_to_multihot, check_multihot_to_indices};
use moe_core::tensor::{DType, Tensor};

use crate::device::{Arg, Buffer, Device};
use crate::error::Result;
use crate::permute as ops;
use crate::tensor::{on_host, opt_meta, upload_owned_opt, DeviceTensor};

/// Tokens a chunk of the column-count kernels (LAYOUT_CHUNK in kernels/layout.cu).
pub const LAYOUT_CHUNK: usize = 64;
/// Words a thread moves in the chunk copy (LAYOUT_UNROLL in kernels/layout.cu).
const LAYOUT_UNROLL: usize = 4;
/// Largest `chunks * numLocalExperts` table of groupedMmSort (and largest numLocalExperts on the GPU).
const GROUPED_TABLE: usize = 1 << 24;

fn fits_i32(v: usize) -> bool {
    i32::try_from(v).is_ok()
}

/// Whether `cols` columns fit the column kernels' grid (grid.y <= 65535 blocks of 256).
pub(crate) fn columns_fit(cols: usize) -> bool {
    fits_i32(cols) && cols.div_ceil(256) <= 65_535
}

fn p(dev: &Device, b: &Buffer) -> Arg {
    Arg::U64(b.ptr(dev.stream()))
}

fn opt_p(dev: &Device, b: Option<&Buffer>) -> Arg {
    Arg::U64(b.map_or(0, |b| b.ptr(dev.stream())))
}

/// A cleared 4-byte error word.
pub(crate) fn error_word(dev: &Device) -> Result<Buffer> {
    let err = dev.alloc("the error word", 4)?;
    dev.memset_u32("the error word", &err, 0, 1)?;
    Ok(err)
}

/// Whether a kernel set the error word (a synchronisation).
pub(crate) fn error_set(dev: &Device, err: &Buffer) -> Result<bool> {
    Ok(dev.read_head::<u32, 1>("the error word", err, 0)?[0] != 0)
}

fn up(dev: &Device, what: &str, t: &Tensor) -> Result<DeviceTensor> {
    DeviceTensor::upload_owned(dev, what, t)
}

/// Column counts of a `[rows, cols]` bool map on the GPU: `(chunk_base, counts)`, where
/// `chunk_base [ceil(rows / 64), cols]` holds, for each chunk of 64 rows, the selected rows of
/// each column before it, and `counts [cols]` the totals. `rows` and `cols` must fit int32 and
/// `cols` [`columns_fit`].
pub(crate) fn column_counts(dev: &Device, map: &Buffer, rows: usize, cols: usize) -> Result<(Buffer, Buffer)> {
    let chunks = rows.div_ceil(LAYOUT_CHUNK);
    let col_threads = (cols.min(256).div_ceil(32).max(1) * 32) as u32;
    let col_blocks = cols.div_ceil(col_threads as usize) as u32;
    let chunk_base = dev.alloc("the column counts (chunks)", chunks * cols * 4)?;
    let counts = dev.alloc("the column counts", cols * 4)?;
    dev.launch(
        "layout_chunk_count",
        (chunks as u32, col_blocks),
        col_threads,
        &[p(dev, map), Arg::I32(rows as i32), Arg::I32(cols as i32), p(dev, &chunk_base)],
    )?;
    dev.launch(
        "layout_chunk_scan",
        (cols.div_ceil(256) as u32, 1),
        256,
        &[p(dev, &chunk_base), Arg::I32(chunks as i32), Arg::I32(cols as i32), p(dev, &counts)],
    )?;
    Ok((chunk_base, counts))
}

/// `out [n + 1]`: the exclusive prefix sums of `counts [n]` (int32), `out[n]` the total.
pub(crate) fn exclusive_offsets(dev: &Device, counts: &Buffer, n: usize) -> Result<Buffer> {
    let out = dev.alloc("the offsets", (n + 1) * 4)?;
    dev.launch("layout_scan_exclusive", (1, 1), 1024, &[p(dev, counts), Arg::I32(n as i32), p(dev, &out)])?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// indicesToMultihot / multihotToIndices

/// What [`indices_to_multihot_device`] returns (the core's `Multihot`, on the GPU).
pub struct DeviceMultihot {
    pub routing_map: DeviceTensor,
    pub probs: DeviceTensor,
}

/// [`moe_core::routing_map::indices_to_multihot`] on device tensors.
pub fn indices_to_multihot_device(
    dev: &Device,
    indices: &DeviceTensor,
    probs: &DeviceTensor,
    num_experts: usize,
) -> Result<DeviceMultihot> {
    let checked = check_indices_to_multihot(indices.meta("indices"), probs.meta("probs"), num_experts);
    let fast =
        checked.ok().filter(|&(t, k)| fits_i32(t) && fits_i32(k) && fits_i32(num_experts) && (t * num_experts).checked_mul(4).is_some());
    if let Some((t, k)) = fast {
        let e = num_experts;
        let map = DeviceTensor::alloc(dev, "routingMap", DType::Bool, vec![t, e])?;
        let dense = DeviceTensor::alloc(dev, "probs", DType::F32, vec![t, e])?;
        let err = error_word(dev)?;
        dev.launch(
            "multihot_from_indices",
            (t as u32, 1),
            256,
            &[
                p(dev, &indices.buf),
                p(dev, &probs.buf),
                Arg::I32(t as i32),
                Arg::I32(k as i32),
                Arg::I32(e as i32),
                p(dev, &map.buf),
                p(dev, &dense.buf),
                p(dev, &err),
            ],
        )?;
        // route's picks (k distinct experts below E a row, or -1) cannot fail the kernel's checks
        let from_route = indices.facts.picks.is_some_and(|p| p.experts == e);
        if from_route || !error_set(dev, &err)? {
            let mut map = map;
            // every row's k picks: exactly t k true entries (permute need not count them)
            map.facts.true_entries = indices.facts.picks.filter(|p| from_route && p.full).map(|_| t * k);
            return Ok(DeviceMultihot { routing_map: map, probs: dense });
        }
    }
    let out = on_host(dev, [("indices", indices), ("probs", probs)], [], |[i, p], []| {
        moe_core::routing_map::indices_to_multihot(&i, &p, num_experts)
    })?;
    Ok(DeviceMultihot { routing_map: up(dev, "routingMap", &out.routing_map)?, probs: up(dev, "probs", &out.probs)? })
}

/// What [`multihot_to_indices_device`] returns (the core's `TopK`, on the GPU).
pub struct DeviceTopK {
    pub indices: DeviceTensor,
    pub probs: DeviceTensor,
}

/// [`moe_core::routing_map::multihot_to_indices`] on device tensors (reads the widest row: 4 bytes).
pub fn multihot_to_indices_device(
    dev: &Device,
    routing_map: &DeviceTensor,
    probs: Option<&DeviceTensor>,
    topk: Option<usize>,
) -> Result<DeviceTopK> {
    let checked = check_multihot_to_indices(routing_map.meta("routingMap"), opt_meta(probs, "probs"));
    let fast = checked.ok().filter(|&(t, e)| fits_i32(t) && fits_i32(e) && topk.is_none_or(fits_i32));
    if let Some((t, e)) = fast {
        let widest = dev.alloc("the widest row", 4)?;
        dev.memset_u32("the widest row", &widest, 0, 1)?;
        let blocks = t.div_ceil(4) as u32;
        dev.launch(
            "multihot_row_max",
            (blocks, 1),
            128,
            &[p(dev, &routing_map.buf), Arg::I32(t as i32), Arg::I32(e as i32), p(dev, &widest)],
        )?;
        let max = dev.read_head::<u32, 1>("the widest row", &widest, 0)?[0] as usize;
        let k = topk.unwrap_or(max);
        if max <= k && fits_i32(k) && t.checked_mul(k).and_then(|c| c.checked_mul(4)).is_some() {
            let indices = DeviceTensor::alloc(dev, "indices", DType::I32, vec![t, k])?;
            let out_probs = DeviceTensor::alloc(dev, "probs", DType::F32, vec![t, k])?;
            dev.launch(
                "multihot_to_indices_fill",
                (blocks, 1),
                128,
                &[
                    p(dev, &routing_map.buf),
                    opt_p(dev, probs.map(|p| &p.buf)),
                    Arg::I32(t as i32),
                    Arg::I32(e as i32),
                    Arg::I32(k as i32),
                    p(dev, &indices.buf),
                    p(dev, &out_probs.buf),
                ],
            )?;
            return Ok(DeviceTopK { indices, probs: out_probs });
        }
    }
    let out = on_host(dev, [("routingMap", routing_map)], [("probs", probs)], |[m], [p]| {
        moe_core::routing_map::multihot_to_indices(&m, p.as_ref(), topk)
    })?;
    Ok(DeviceTopK { indices: up(dev, "indices", &out.indices)?, probs: up(dev, "probs", &out.probs)? })
}

// ---------------------------------------------------------------------------------------
// tokensPerExpert, padRoutingMap, dropTokens

/// A checked routing map's `(numTokens, numExperts)` when the column kernels take it.
fn map_fits(checked: moe_core::Result<(usize, usize)>) -> Option<(usize, usize)> {
    checked.ok().filter(|&(t, e)| fits_i32(t) && columns_fit(e))
}

/// [`moe_core::capacity::tokens_per_expert`] on device tensors (no synchronisation).
pub fn tokens_per_expert_device(dev: &Device, routing_map: &DeviceTensor) -> Result<DeviceTensor> {
    if let Some((t, e)) = map_fits(check_tokens_per_expert(routing_map.meta("routingMap"))) {
        let (_, counts) = column_counts(dev, &routing_map.buf, t, e)?;
        return Ok(DeviceTensor::from_buffer(DType::I32, vec![e], counts));
    }
    up(dev, "tokensPerExpert", &on_host(dev, [("routingMap", routing_map)], [], |[m], []| moe_core::capacity::tokens_per_expert(&m))?)
}

/// [`moe_core::capacity::pad_routing_map`] on device tensors (no synchronisation).
pub fn pad_routing_map_device(dev: &Device, routing_map: &DeviceTensor, pad_multiple: usize) -> Result<DeviceTensor> {
    let multiple = i64::try_from(pad_multiple).ok();
    if let (Some((t, e)), Some(m)) = (map_fits(check_pad_routing_map(routing_map.meta("routingMap"), pad_multiple)), multiple) {
        let (chunk_base, counts) = column_counts(dev, &routing_map.buf, t, e)?;
        let out = DeviceTensor::alloc(dev, "the padded routing map", DType::Bool, vec![t, e])?;
        let col_threads = (e.min(256).div_ceil(32).max(1) * 32) as u32;
        let col_blocks = e.div_ceil(col_threads as usize) as u32;
        dev.launch(
            "pad_routing_fill",
            (t.div_ceil(LAYOUT_CHUNK) as u32, col_blocks),
            col_threads,
            &[
                p(dev, &routing_map.buf),
                Arg::I32(t as i32),
                Arg::I32(e as i32),
                p(dev, &chunk_base),
                p(dev, &counts),
                Arg::I64(m),
                p(dev, &out.buf),
            ],
        )?;
        return Ok(out);
    }
    let out = on_host(dev, [("routingMap", routing_map)], [], |[m], []| moe_core::capacity::pad_routing_map(&m, pad_multiple))?;
    up(dev, "the padded routing map", &out)
}

/// What [`drop_tokens_device`] returns (the core's `Dropped`, on the GPU).
pub struct DeviceDropped {
    pub routing_map: DeviceTensor,
    pub probs: DeviceTensor,
    pub capacity: usize,
}

/// How the capacity mask is formed: 0 all false (capacity 0), 1 all true (capacity >= T),
/// 2 by the mask kernels.
pub fn drop_mode(capacity: usize, num_tokens: usize) -> i32 {
    if capacity >= num_tokens {
        1
    } else if capacity == 0 {
        0
    } else {
        2
    }
}

/// [`moe_core::capacity::drop_tokens`] on device tensors (no synchronisation). With the
/// 'probs' policy each expert's top-`capacity` tokens are found by an exact radix select
/// (ties to the lower token id, NaN first, -0 == +0), one block per expert.
pub fn drop_tokens_device(dev: &Device, probs: &DeviceTensor, routing_map: &DeviceTensor, options: DropOptions) -> Result<DeviceDropped> {
    let checked = check_drop_tokens(probs.meta("probs"), routing_map.meta("routingMap"), &options);
    let fast = checked.ok().filter(|c| fits_i32(c.num_tokens) && columns_fit(c.num_experts));
    if let Some(DropCheck { num_tokens: t, num_experts: e, capacity }) = fast {
        let mode = drop_mode(capacity, t);
        let mask = if mode == 2 {
            let mask = dev.alloc("the capacity mask", t * e)?;
            let (name, src) = match options.drop_policy {
                DropPolicy::Probs => ("drop_mask_probs", &probs.buf),
                DropPolicy::Position => ("drop_mask_position", &routing_map.buf),
            };
            dev.launch(
                name,
                (e as u32, 1),
                1024,
                &[p(dev, src), Arg::I32(t as i32), Arg::I32(e as i32), Arg::I32(capacity as i32), p(dev, &mask)],
            )?;
            Some(mask)
        } else {
            None
        };
        let out_map = DeviceTensor::alloc(dev, "routingMap", DType::Bool, vec![t, e])?;
        let out_probs = DeviceTensor::alloc(dev, "probs", DType::F32, vec![t, e])?;
        let n = t * e;
        dev.launch(
            "drop_apply",
            (n.div_ceil(256).min(1 << 20) as u32, 1),
            256,
            &[
                p(dev, &routing_map.buf),
                p(dev, &probs.buf),
                opt_p(dev, mask.as_ref()),
                Arg::I64(n as i64),
                Arg::I32(mode),
                Arg::I32(options.pad_to_capacity as i32),
                p(dev, &out_map.buf),
                p(dev, &out_probs.buf),
            ],
        )?;
        return Ok(DeviceDropped { routing_map: out_map, probs: out_probs, capacity });
    }
    let out =
        on_host(dev, [("probs", probs), ("routingMap", routing_map)], [], |[p, m], []| moe_core::capacity::drop_tokens(&p, &m, options))?;
    Ok(DeviceDropped {
        routing_map: up(dev, "routingMap", &out.routing_map)?,
        probs: up(dev, "probs", &out.probs)?,
        capacity: out.capacity,
    })
}

// ---------------------------------------------------------------------------------------
// sortChunksByIndex and its backward

/// What the chunk sorts return (the core's `SortedChunks`, on the GPU).
pub struct DeviceSortedChunks {
    pub output: DeviceTensor,
    pub probs: Option<DeviceTensor>,
}

/// The chunk layout as the copy kernels read it: for each output chunk in output order, its
/// first output row and its first source row. None when the sizes or the order are invalid
/// (the core reports them): negative sizes, a total other than `num_rows`, an order that is
/// not a permutation of `0..C`.
pub fn chunk_layout(sizes: &[i32], order: &[i32], num_rows: usize, backward: bool) -> Option<(Vec<i32>, Vec<i32>)> {
    let c = sizes.len();
    if order.len() != c || sizes.iter().any(|&s| s < 0) {
        return None;
    }
    let total: u64 = sizes.iter().map(|&s| s as u64).sum();
    if total != num_rows as u64 || !fits_i32(num_rows) {
        return None;
    }
    let mut seen = vec![false; c];
    for &i in order {
        if i < 0 || i as usize >= c || std::mem::replace(&mut seen[i as usize], true) {
            return None;
        }
    }
    let mut starts = Vec::with_capacity(c);
    let mut at = 0i32;
    for &s in sizes {
        starts.push(at);
        at += s;
    }
    // where each chunk lands in the sorted layout
    let mut sorted_start = vec![0i32; c];
    let mut at = 0i32;
    let mut out_start_fwd = Vec::with_capacity(c);
    let mut src_start_fwd = Vec::with_capacity(c);
    for &i in order {
        let i = i as usize;
        sorted_start[i] = at;
        out_start_fwd.push(at);
        src_start_fwd.push(starts[i]);
        at += sizes[i];
    }
    Some(if backward { (starts, sorted_start) } else { (out_start_fwd, src_start_fwd) })
}

fn chunk_sort(
    dev: &Device,
    x: &DeviceTensor,
    split_sizes: &DeviceTensor,
    sorted_idxs: &DeviceTensor,
    probs: Option<&DeviceTensor>,
    backward: bool,
) -> Result<DeviceSortedChunks> {
    let (x_name, p_name) = if backward { ("gradOutput", "gradProbs") } else { ("input", "probs") };
    let checked = check_sort_chunks(
        x.meta(x_name),
        split_sizes.meta("splitSizes"),
        sorted_idxs.meta("sortedIdxs"),
        opt_meta(probs, p_name),
        backward,
    );
    let layout = if let Some((_, c)) = checked.ok().filter(|&(n, c)| fits_i32(n) && fits_i32(c)) {
        let sizes: Vec<i32> = dev.download_new("splitSizes", &split_sizes.buf, c)?;
        let order: Vec<i32> = dev.download_new("sortedIdxs", &sorted_idxs.buf, c)?;
        chunk_layout(&sizes, &order, x.shape[0], backward)
    } else {
        None
    };
    let (out_name, probs_name) = if backward { ("gradInput", "gradProbs") } else { ("output", "probs") };
    if let Some((out_start, src_start)) = layout {
        let (n, hidden) = (x.shape[0], x.shape[1]);
        let c = out_start.len();
        let out = DeviceTensor::alloc(dev, out_name, x.dtype, vec![n, hidden])?;
        let out_probs = probs.map(|_| DeviceTensor::alloc(dev, probs_name, DType::F32, vec![n])).transpose()?;
        if n > 0 {
            let d_out_start = dev.upload("the chunk layout", &out_start)?;
            let d_src_start = dev.upload("the chunk layout", &src_start)?;
            let row_bytes = hidden * x.dtype.size();
            if row_bytes > 0 {
                let w = ops::word_bytes(row_bytes);
                let words = row_bytes / w;
                let (threads, col_blocks) = ops::row_launch(words.div_ceil(LAYOUT_UNROLL))?;
                dev.launch(
                    &format!("chunk_copy_w{w}"),
                    (n as u32, col_blocks),
                    threads,
                    &[
                        p(dev, &x.buf),
                        p(dev, &out.buf),
                        Arg::I64(words as i64),
                        p(dev, &d_out_start),
                        p(dev, &d_src_start),
                        Arg::I32(c as i32),
                    ],
                )?;
            }
            if let (Some(src), Some(dst)) = (probs, &out_probs) {
                dev.launch(
                    "chunk_probs",
                    (n.div_ceil(256) as u32, 1),
                    256,
                    &[
                        p(dev, &src.buf),
                        p(dev, &dst.buf),
                        Arg::I32(n as i32),
                        p(dev, &d_out_start),
                        p(dev, &d_src_start),
                        Arg::I32(c as i32),
                    ],
                )?;
            }
        }
        return Ok(DeviceSortedChunks { output: out, probs: out_probs });
    }
    let sort = if backward { moe_core::chunks::sort_chunks_by_index_backward } else { moe_core::chunks::sort_chunks_by_index };
    let required = [(x_name, x), ("splitSizes", split_sizes), ("sortedIdxs", sorted_idxs)];
    let out = on_host(dev, required, [(p_name, probs)], |[x, s, o], [p]| sort(&x, &s, &o, p.as_ref()))?;
    Ok(DeviceSortedChunks { output: up(dev, out_name, &out.output)?, probs: upload_owned_opt(dev, probs_name, out.probs.as_ref())? })
}

/// [`moe_core::chunks::sort_chunks_by_index`] on device tensors (reads splitSizes and
/// sortedIdxs, 4 bytes a chunk, to check them; rows move as raw words).
pub fn sort_chunks_by_index_device(
    dev: &Device,
    input: &DeviceTensor,
    split_sizes: &DeviceTensor,
    sorted_idxs: &DeviceTensor,
    probs: Option<&DeviceTensor>,
) -> Result<DeviceSortedChunks> {
    chunk_sort(dev, input, split_sizes, sorted_idxs, probs, false)
}

/// [`moe_core::chunks::sort_chunks_by_index_backward`] on device tensors.
pub fn sort_chunks_by_index_backward_device(
    dev: &Device,
    grad_output: &DeviceTensor,
    split_sizes: &DeviceTensor,
    sorted_idxs: &DeviceTensor,
    grad_probs: Option<&DeviceTensor>,
) -> Result<DeviceSortedChunks> {
    chunk_sort(dev, grad_output, split_sizes, sorted_idxs, grad_probs, true)
}

// ---------------------------------------------------------------------------------------
// groupedMmSort

/// What [`grouped_mm_sort_device`] returns (the core's `GroupedSort`, on the GPU).
pub struct DeviceGroupedSort {
    pub sorted_token_ids: DeviceTensor,
    pub sorted_slot_ids: DeviceTensor,
    pub sorted_weights: DeviceTensor,
    pub tokens_per_expert: DeviceTensor,
    pub offsets: DeviceTensor,
}

/// `(per_chunk, chunks)` of the grouped sort for `n` slots and `l` local experts: chunks of at
/// least 64 slots, and at most [`GROUPED_TABLE`] entries in the `[chunks, l]` table.
pub fn grouped_chunks(n: usize, l: usize) -> (usize, usize) {
    if n == 0 {
        return (1, 0);
    }
    let target = n.div_ceil(LAYOUT_CHUNK).min((GROUPED_TABLE / l.max(1)).max(1));
    let per_chunk = n.div_ceil(target);
    (per_chunk, n.div_ceil(per_chunk))
}

/// [`moe_core::grouped::grouped_mm_sort`] on device tensors (reads its error word and the slot
/// count: one synchronisation). A stable counting sort by local expert.
pub fn grouped_mm_sort_device(
    dev: &Device,
    indices: &DeviceTensor,
    weights: &DeviceTensor,
    token_mask: Option<&DeviceTensor>,
    num_local_experts: usize,
    experts_start_idx: usize,
) -> Result<DeviceGroupedSort> {
    let checked = check_grouped_mm_sort(
        indices.meta("indices"),
        weights.meta("weights"),
        opt_meta(token_mask, "tokenMask"),
        num_local_experts,
        experts_start_idx,
    );
    if let Some(GroupedCheck { num_tokens: t, topk: k, start, end }) = checked.ok().filter(|_| num_local_experts <= GROUPED_TABLE) {
        let (l, n) = (num_local_experts, t * k);
        let (per_chunk, chunks) = grouped_chunks(n, l);
        let table = dev.alloc("the grouped sort (chunk counts)", chunks * l * 4)?;
        dev.memset_u32("the grouped sort (chunk counts)", &table, 0, chunks * l)?;
        let err = error_word(dev)?;
        let blocks = (chunks.div_ceil(128) as u32, 1);
        let mask = opt_p(dev, token_mask.map(|m| &m.buf));
        let common = [
            Arg::I32(n as i32),
            Arg::I32(k as i32),
            Arg::I64(start),
            Arg::I64(end),
            Arg::I32(l as i32),
            Arg::I32(per_chunk as i32),
            Arg::I32(chunks as i32),
        ];
        let mut args = vec![p(dev, &indices.buf), mask];
        args.extend_from_slice(&common);
        args.extend_from_slice(&[p(dev, &table), p(dev, &err)]);
        dev.launch("grouped_count", blocks, 128, &args)?;
        let counts = dev.alloc("tokensPerExpert", l * 4)?;
        dev.launch(
            "layout_chunk_scan",
            (l.div_ceil(256) as u32, 1),
            256,
            &[p(dev, &table), Arg::I32(chunks as i32), Arg::I32(l as i32), p(dev, &counts)],
        )?;
        let offs = exclusive_offsets(dev, &counts, l)?;
        if !error_set(dev, &err)? {
            let total = dev.read_head::<i32, 1>("the number of local slots", &offs, l)?[0] as usize;
            let token_ids = DeviceTensor::alloc(dev, "sortedTokenIds", DType::I32, vec![total])?;
            let slot_ids = DeviceTensor::alloc(dev, "sortedSlotIds", DType::I32, vec![total])?;
            let sorted_weights = DeviceTensor::alloc(dev, "sortedWeights", DType::F32, vec![total])?;
            let name = match weights.dtype {
                DType::BF16 => "grouped_fill_bf16",
                DType::F16 => "grouped_fill_f16",
                _ => "grouped_fill_f32",
            };
            let mut args = vec![p(dev, &indices.buf), mask, p(dev, &weights.buf)];
            args.extend_from_slice(&common);
            args.extend_from_slice(&[
                p(dev, &table),
                p(dev, &offs),
                p(dev, &token_ids.buf),
                p(dev, &slot_ids.buf),
                p(dev, &sorted_weights.buf),
                p(dev, &err),
            ]);
            dev.launch(name, blocks, 128, &args)?;
            let offsets = DeviceTensor::alloc(dev, "offsets", DType::I32, vec![l])?;
            dev.launch("grouped_offsets", (l.div_ceil(256) as u32, 1), 256, &[p(dev, &offs), Arg::I32(l as i32), p(dev, &offsets.buf)])?;
            return Ok(DeviceGroupedSort {
                sorted_token_ids: token_ids,
                sorted_slot_ids: slot_ids,
                sorted_weights,
                tokens_per_expert: DeviceTensor::from_buffer(DType::I32, vec![l], counts),
                offsets,
            });
        }
    }
    let out = on_host(dev, [("indices", indices), ("weights", weights)], [("tokenMask", token_mask)], |[i, w], [m]| {
        moe_core::grouped::grouped_mm_sort(&i, &w, m.as_ref(), num_local_experts, experts_start_idx)
    })?;
    Ok(DeviceGroupedSort {
        sorted_token_ids: up(dev, "sortedTokenIds", &out.sorted_token_ids)?,
        sorted_slot_ids: up(dev, "sortedSlotIds", &out.sorted_slot_ids)?,
        sorted_weights: up(dev, "sortedWeights", &out.sorted_weights)?,
        tokens_per_expert: up(dev, "tokensPerExpert", &out.tokens_per_expert)?,
        offsets: up(dev, "offsets", &out.offsets)?,
    })
}

// ---------------------------------------------------------------------------------------
// Expert parallelism's send side (ts/ep.ts's dispatch on device tensors)

/// Largest group [`ep_send_plan_device`] takes (its counts sit in shared memory, two words a rank).
pub const EP_MAX_RANKS: usize = 4096;

/// What [`ep_send_plan_device`] returns.
pub struct EpSendPlan {
    /// `[T, N]` bool: the ranks each token goes to (each once).
    pub send_map: DeviceTensor,
    /// The tokens sent to each rank.
    pub send_counts: Vec<i32>,
    /// The picks each rank receives (of the tokens sent to it).
    pub pick_counts: Vec<i32>,
    /// A pick outside `[0, E)` and not -1, or a row listing an expert twice: the map and counts
    /// then mean nothing (the caller names the pick from the indices on the host).
    pub bad_picks: bool,
}

/// `owner` (the rank of each expert, `[0, num_ranks)`) checked, or a RangeError naming it.
fn check_owner(owner: &[i32], num_ranks: usize) -> Result<()> {
    if num_ranks == 0 || num_ranks > EP_MAX_RANKS {
        return Err(moe_core::Error::range("numRanks", format!("expected 1 to {EP_MAX_RANKS} ranks, got {num_ranks}")).into());
    }
    if owner.is_empty() || !fits_i32(owner.len()) {
        return Err(
            moe_core::Error::range("owner", format!("expected one rank an expert (1 to 2^31 - 1 experts), got {}", owner.len())).into()
        );
    }
    if let Some((e, r)) = owner.iter().enumerate().find(|&(_, &r)| r < 0 || r as usize >= num_ranks) {
        return Err(moe_core::Error::range("owner", format!("element {e} = {r} is outside [0, numRanks = {num_ranks})")).into());
    }
    Ok(())
}

/// `t`'s dtype and rank-2 shape, or a TypeError / RangeError naming `arg`.
fn matrix(t: &DeviceTensor, arg: &str, dtype: DType) -> Result<(usize, usize)> {
    if t.dtype != dtype {
        return Err(moe_core::Error::type_error(format!("{arg}.dtype"), dtype.name(), t.dtype.name()).into());
    }
    match t.shape[..] {
        [rows, cols] if fits_i32(cols) => Ok((rows, cols)),
        _ => Err(moe_core::Error::range(format!("{arg}.shape"), format!("expected [rows, cols], got {:?}", t.shape)).into()),
    }
}

/// The send side of expert parallelism's dispatch on the GPU: from the picks `indices [T, k]`
/// (int32 global expert ids, -1 masked) and `owner` (the rank of each expert), the `[T, N]` map of
/// the ranks each token goes to and each rank's token and pick counts. One synchronisation: the
/// counts (`2N + 1` words) are read back, since the exchange's sizes live on the host.
pub fn ep_send_plan_device(dev: &Device, indices: &DeviceTensor, owner: &[i32], num_ranks: usize) -> Result<EpSendPlan> {
    let (t, k) = matrix(indices, "indices", DType::I32)?;
    check_owner(owner, num_ranks)?;
    let n = num_ranks;
    if t.checked_mul(n).is_none_or(|b| b > i64::MAX as usize) {
        return Err(moe_core::Error::range("indices.shape", format!("[{t}, {k}] with {n} ranks: the send map is too large")).into());
    }
    let owner_d = DeviceTensor::upload_owned(dev, "the experts' ranks", &Tensor::i32(vec![owner.len()], owner.to_vec()))?;
    let map = DeviceTensor::alloc(dev, "the send map", DType::Bool, vec![t, n])?;
    let counts = dev.alloc("the send counts", (2 * n + 1) * 4)?;
    dev.memset_zero("the send counts", &counts, (2 * n + 1) * 4)?;
    if t > 0 {
        let blocks = t.div_ceil(256).clamp(1, 16 * dev.sm_count()) as u32;
        dev.launch_shared(
            "ep_send_plan",
            (blocks, 1),
            256,
            (2 * n * 4) as u32,
            &[
                p(dev, &indices.buf),
                Arg::I64(t as i64),
                Arg::I32(k as i32),
                p(dev, &owner_d.buf),
                Arg::I32(owner.len() as i32),
                Arg::I32(n as i32),
                p(dev, &map.buf),
                p(dev, &counts),
            ],
        )?;
    }
    let c: Vec<i32> = dev.download_new("the send counts", &counts, 2 * n + 1)?;
    let bad_picks = c[2 * n] != 0;
    let mut map = map;
    // the map's true entries, counted by the kernel: permute given this many slots need not read its count back
    if !bad_picks {
        map.facts.true_entries = Some(c[..n].iter().map(|&v| v as usize).sum());
    }
    Ok(EpSendPlan { send_map: map, send_counts: c[..n].to_vec(), pick_counts: c[n..2 * n].to_vec(), bad_picks })
}

/// What travels with each sent row: for the send permutation's slots (`sorted`, permute's
/// sortedIndices of [`ep_send_plan_device`]'s map: tokens rank by rank, its plan on the GPU) and
/// each pick of the slot's token, the pick as the receiving rank's local expert id (the expert's
/// place among its rank's experts, ascending; -1 where it lives elsewhere or is masked) and its
/// weight (0 elsewhere): `([S, k] int32, [S, k] float32)`. `indices` must be the picks the plan
/// was made from (checked there).
pub fn ep_rank_extras_device(
    dev: &Device,
    sorted: &DeviceTensor,
    indices: &DeviceTensor,
    weights: &DeviceTensor,
    owner: &[i32],
) -> Result<(DeviceTensor, DeviceTensor)> {
    let (t, k) = matrix(indices, "indices", DType::I32)?;
    let (wt, wk) = matrix(weights, "weights", DType::F32)?;
    if (wt, wk) != (t, k) {
        return Err(moe_core::Error::range(
            "weights.shape",
            format!("expected [{t}, {k}] (the shape of indices), got {:?}", weights.shape),
        )
        .into());
    }
    // the slots' tokens and where each rank's slots start: permute's plan, made on the GPU for
    // these tokens (so every slot's token is below T)
    let plan = sorted.plan.as_ref().filter(|pl| sorted.dtype == DType::I32 && pl.num_tokens == t && sorted.shape == [pl.num_slots]);
    let Some(plan) = plan else {
        return Err(moe_core::Error::type_error(
            "sorted",
            format!("the sortedIndices permute made on the GPU from the send map of these {t} tokens"),
            "another tensor",
        )
        .into());
    };
    let n = plan.num_experts;
    check_owner(owner, n)?;
    // each expert's place among its rank's experts (ascending), after its rank
    let mut seen = vec![0i32; n];
    let mut table = owner.to_vec();
    table.extend(owner.iter().map(|&r| {
        seen[r as usize] += 1;
        seen[r as usize] - 1
    }));
    let table_d = DeviceTensor::upload_owned(dev, "the experts' ranks and local ids", &Tensor::i32(vec![table.len()], table))?;
    let s = plan.num_slots;
    let local = DeviceTensor::alloc(dev, "the picks' local experts", DType::I32, vec![s, k])?;
    let local_w = DeviceTensor::alloc(dev, "the picks' weights", DType::F32, vec![s, k])?;
    if s * k > 0 {
        let owner_ptr = table_d.buf.ptr(dev.stream());
        dev.launch(
            "ep_rank_extras",
            ((s * k).div_ceil(256).clamp(1, 16 * dev.sm_count()) as u32, 1),
            256,
            &[
                p(dev, &sorted.buf),
                Arg::I64(s as i64),
                p(dev, &indices.buf),
                p(dev, &weights.buf),
                Arg::I32(k as i32),
                Arg::U64(owner_ptr),
                Arg::U64(owner_ptr + 4 * owner.len() as u64),
                p(dev, &plan.expert_offsets),
                Arg::I32(n as i32),
                p(dev, &local.buf),
                p(dev, &local_w.buf),
            ],
        )?;
    }
    Ok((local, local_w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile;
    use crate::device::kernel_names;

    #[test]
    fn every_layout_kernel_is_listed() {
        let names = kernel_names(compile::LAYOUT.source);
        let want = [
            "multihot_from_indices",
            "multihot_row_max",
            "multihot_to_indices_fill",
            "layout_chunk_count",
            "layout_chunk_scan",
            "layout_scan_exclusive",
            "pad_routing_fill",
            "drop_mask_probs",
            "drop_mask_position",
            "drop_apply",
            "chunk_copy_w16",
            "chunk_copy_w8",
            "chunk_copy_w4",
            "chunk_copy_w2",
            "chunk_probs",
            "grouped_count",
            "grouped_fill_f32",
            "grouped_fill_bf16",
            "grouped_fill_f16",
            "grouped_offsets",
            "slot_expert_check",
            "probs_grad_scatter",
            "unpermute_bwd_scale_f32",
            "unpermute_bwd_scale_bf16",
            "unpermute_bwd_scale_f16",
            "slot_dot_f32",
            "slot_dot_bf16",
            "slot_dot_f16",
            "ep_send_plan",
            "ep_rank_extras",
        ];
        for n in want {
            assert!(names.contains(&n.to_string()), "{n} missing from {names:?}");
        }
        // every `extern "C" __global__` line of the file names a kernel that the parser finds
        let declared = compile::LAYOUT.source.lines().filter(|l| l.trim_start().starts_with("extern \"C\" __global__")).count();
        assert_eq!(names.len(), declared, "{names:?}");
        assert_eq!(names.len(), want.len(), "{names:?}");
        // and no name collides with another file's kernel (one function table per device)
        for other in compile::ALL.iter().filter(|s| s.file != compile::LAYOUT.file) {
            for n in kernel_names(other.source) {
                assert!(!names.contains(&n), "{n} is defined in kernels/{} and kernels/layout.cu", other.file);
            }
        }
    }

    #[test]
    fn chunk_layout_matches_the_core() {
        // 5 rows in chunks [2, 0, 3], order [2, 0, 1] (the core's test): forward output chunks
        // 2 (rows 2..5), 0 (rows 0..2), 1 (empty).
        let (out_start, src_start) = chunk_layout(&[2, 0, 3], &[2, 0, 1], 5, false).unwrap();
        assert_eq!(out_start, vec![0, 3, 5]);
        assert_eq!(src_start, vec![2, 0, 2]);
        // backward: chunk c of the unsorted layout comes from where forward put it
        let (out_start, src_start) = chunk_layout(&[2, 0, 3], &[2, 0, 1], 5, true).unwrap();
        assert_eq!(out_start, vec![0, 2, 2]);
        assert_eq!(src_start, vec![3, 5, 0]);
        assert!(chunk_layout(&[1, 2], &[0, 1], 4, false).is_none());
        assert!(chunk_layout(&[5, -1], &[0, 1], 4, false).is_none());
        assert!(chunk_layout(&[2, 2], &[1, 1], 4, false).is_none());
        assert!(chunk_layout(&[2, 2], &[0, 2], 4, false).is_none());
        assert!(chunk_layout(&[2, 2], &[0], 4, false).is_none());
        assert_eq!(chunk_layout(&[], &[], 0, false), Some((vec![], vec![])));
    }

    /// The kernels' row lookup (the last output chunk starting at or before the row), on the
    /// host, against the core's row lists.
    #[test]
    fn chunk_rows_match_the_core_rows() {
        fn src_row(out_start: &[i32], src_start: &[i32], r: i32) -> i32 {
            let i = out_start.iter().rposition(|&s| s <= r).unwrap();
            src_start[i] + (r - out_start[i])
        }
        let x: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let xr = moe_core::TensorRef::of("input", vec![9, 1], &x).unwrap();
        for (sizes, order) in [
            (vec![2, 0, 3, 4], vec![3, 1, 0, 2]),
            (vec![0, 9, 0], vec![2, 1, 0]),
            (vec![1, 1, 1, 1, 1, 1, 1, 1, 1], vec![8, 7, 6, 5, 4, 3, 2, 1, 0]),
        ] {
            let sr = moe_core::TensorRef::of("splitSizes", vec![sizes.len()], &sizes[..]).unwrap();
            let or = moe_core::TensorRef::of("sortedIdxs", vec![order.len()], &order[..]).unwrap();
            for backward in [false, true] {
                let want = if backward {
                    moe_core::chunks::sort_chunks_by_index_backward(&xr, &sr, &or, None).unwrap()
                } else {
                    moe_core::chunks::sort_chunks_by_index(&xr, &sr, &or, None).unwrap()
                };
                let (o, s) = chunk_layout(&sizes, &order, 9, backward).unwrap();
                let got: Vec<f32> = (0..9).map(|r| src_row(&o, &s, r) as f32).collect();
                assert_eq!(want.output.data, moe_core::tensor::Data::F32(got), "{sizes:?} {order:?} backward={backward}");
            }
        }
    }

    /// drop_key (kernels/layout.cu) on the host: sorting by (key, token) gives the core's order.
    #[test]
    fn drop_key_orders_like_the_core() {
        fn drop_key(b: u32) -> u32 {
            let mag = b & 0x7fff_ffff;
            if mag > 0x7f80_0000 {
                return 0;
            }
            let b = if mag == 0 { 0 } else { b };
            let ordered = if b & 0x8000_0000 != 0 { !b } else { b | 0x8000_0000 };
            !ordered
        }
        let vals = [
            0.5f32,
            -0.0,
            0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -1.0,
            1.0,
            0.5,
            f32::from_bits(0xffc0_0001),
            1e-45,
            -1e-45,
            3.0,
            -3.0,
        ];
        let t = vals.len();
        let probs = moe_core::TensorRef::of("probs", vec![t, 1], &vals[..]).unwrap();
        for cap in 1..t {
            let map = vec![1u8; t];
            let mr = moe_core::TensorRef::new("routingMap", DType::Bool, vec![t, 1], &map).unwrap();
            let opts =
                DropOptions { topk: 1, capacity_factor: cap as f64 / t as f64, drop_policy: DropPolicy::Probs, pad_to_capacity: false };
            let want = moe_core::capacity::drop_tokens(&probs, &mr, opts).unwrap();
            assert_eq!(want.capacity, cap);
            let mut order: Vec<usize> = (0..t).collect();
            order.sort_by_key(|&i| (drop_key(vals[i].to_bits()), i));
            let mut got = vec![0u8; t];
            for &i in &order[..cap] {
                got[i] = 1;
            }
            assert_eq!(want.routing_map.data, moe_core::tensor::Data::Bool(got), "capacity {cap}");
        }
    }

    #[test]
    fn capacity_modes() {
        assert_eq!(drop_mode(4, 8), 2);
        assert_eq!(drop_mode(8, 8), 1);
        assert_eq!(drop_mode(0, 8), 0);
        assert_eq!(drop_mode(0, 0), 1);
    }

    #[test]
    fn grouped_chunks_bound_the_table() {
        assert_eq!(grouped_chunks(0, 8), (1, 0));
        assert_eq!(grouped_chunks(100, 8), (50, 2));
        let (per, chunks) = grouped_chunks(131_072, 256);
        assert_eq!((per, chunks), (64, 2048));
        let (per, chunks) = grouped_chunks(1 << 30, 1 << 20);
        assert!(chunks * (1 << 20) <= GROUPED_TABLE && per * chunks >= 1 << 30, "{per} {chunks}");
        let (_, chunks) = grouped_chunks(1000, GROUPED_TABLE);
        assert_eq!(chunks, 1);
    }
}
