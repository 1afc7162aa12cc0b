//! Expert sharding (NeMo Automodel `state_dict_utils`): which experts an expert-parallel rank
//! owns, splitting a rank's stacked expert tensor into per-expert tensors, validating expert
//! dimensions, and the device-mesh placements of expert tensors as plain descriptors.
//!
//! Everything here is integer math on sizes, ranks and axis names: each rank computes what it
//! owns without talking to the others.

use crate::error::{size_arg, Error, Result};
use crate::tensor::{DType, Tensor, TensorRef};

/// The experts `[start, end)` one rank owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertRange {
    pub start: usize,
    pub end: usize,
}

impl ExpertRange {
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

fn check_ep(ep_size: usize, ep_rank: usize) -> Result<()> {
    if ep_size == 0 {
        return Err(Error::range("epSize", "expected at least 1 rank, got 0"));
    }
    if ep_rank >= ep_size {
        return Err(Error::range("epRank", format!("{ep_rank} is outside [0, epSize = {ep_size})")));
    }
    Ok(())
}

/// `base = numExperts / epSize`, `rem = numExperts % epSize`: ranks below `rem` own `base + 1`
/// experts starting at `rank * (base + 1)`; the others own `base`, starting at
/// `rank * base + rem`. Ranges are contiguous, cover `0..numExperts` in rank order, and are
/// empty on the ranks past `numExperts` when `epSize > numExperts`.
pub fn expert_range_for_rank(num_experts: usize, ep_size: usize, ep_rank: usize) -> Result<ExpertRange> {
    check_ep(ep_size, ep_rank)?;
    let (base, rem) = (num_experts / ep_size, num_experts % ep_size);
    let (start, count) = if ep_rank < rem { (ep_rank * (base + 1), base + 1) } else { (ep_rank * base + rem, base) };
    Ok(ExpertRange { start, end: start + count })
}

/// Whether rank `epRank` owns expert `expertId`. An id outside `0..numExperts` is an error
/// (the reference answers `false`; such an id names no expert at all).
pub fn should_load_expert(expert_id: usize, num_experts: usize, ep_size: usize, ep_rank: usize) -> Result<bool> {
    let range = expert_range_for_rank(num_experts, ep_size, ep_rank)?;
    if expert_id >= num_experts {
        return Err(Error::range("expertId", format!("{expert_id} is outside [0, numExperts = {num_experts})")));
    }
    Ok(range.start <= expert_id && expert_id < range.end)
}

/// Copies rows `[first, first + count)` along dim 0 of a tensor (any dtype but int64) as bits.
fn slice_rows(t: &TensorRef, first: usize, count: usize) -> Result<Tensor> {
    let row: usize = t.shape[1..].iter().product();
    let mut shape = vec![count];
    shape.extend_from_slice(&t.shape[1..]);
    let width = t.dtype.size();
    let bytes = &t.bytes()[first * row * width..(first + count) * row * width];
    Ok(match t.dtype {
        DType::F32 => Tensor::f32(shape, bytemuck::pod_collect_to_vec(bytes)),
        DType::BF16 | DType::F16 => Tensor::u16(t.dtype, shape, bytemuck::pod_collect_to_vec(bytes)),
        DType::I32 => Tensor::i32(shape, bytemuck::pod_collect_to_vec(bytes)),
        DType::Bool => Tensor::bool(shape, bytes.to_vec()),
        DType::I64 => {
            return Err(Error::type_error(
                format!("{}.dtype", t.name),
                "float32, bfloat16, float16, int32 or bool (int64 outputs are not supported)",
                "int64",
            ))
        }
    })
}

/// The per-expert tensors of this rank's stacked expert tensor `[end - start, ...]`, each
/// with its global expert id (a bit-exact copy without dim 0). The first dimension must be
/// the number of experts the rank owns (NeMo's `split_experts_weights_dtensor_aware`).
pub fn split_expert_weights(stacked: &TensorRef, num_experts: usize, ep_size: usize, ep_rank: usize) -> Result<Vec<(usize, Tensor)>> {
    let range = expert_range_for_rank(num_experts, ep_size, ep_rank)?;
    if stacked.shape.is_empty() {
        return Err(Error::type_error(format!("{}.shape", stacked.name), "at least 1 dimension [localExperts, ...]", "[]"));
    }
    let local = stacked.shape[0];
    if local != range.len() {
        return Err(Error::range(
            format!("{}.shape[0]", stacked.name),
            format!(
                "expected {} (experts {}..{} of epRank {ep_rank} with epSize {ep_size} and numExperts {num_experts}), got {local}",
                range.len(),
                range.start,
                range.end
            ),
        ));
    }
    let mut out = Vec::with_capacity(local);
    for i in 0..local {
        let mut t = slice_rows(stacked, i, 1)?;
        t.shape.remove(0);
        out.push((range.start + i, t));
    }
    Ok(out)
}

/// A tensor placement on one mesh axis (`torch.distributed.tensor` Shard / Replicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Shard(usize),
    Replicate,
}

impl Placement {
    /// Reads `'replicate'` or `'shard(d)'`; `arg` names the argument in errors.
    pub fn parse(arg: &str, s: &str) -> Result<Placement> {
        if s == "replicate" {
            return Ok(Placement::Replicate);
        }
        let dim = s.strip_prefix("shard(").and_then(|r| r.strip_suffix(')')).and_then(|d| {
            if d.bytes().all(|b| b.is_ascii_digit()) {
                d.parse::<usize>().ok()
            } else {
                None
            }
        });
        dim.map(Placement::Shard).ok_or_else(|| Error::type_error(arg, "'replicate' or 'shard(<dim>)'", format!("'{s}'")))
    }

    pub fn name(self) -> String {
        match self {
            Placement::Shard(d) => format!("shard({d})"),
            Placement::Replicate => "replicate".into(),
        }
    }
}

/// Which experts a tensor of this rank holds, after checking its expert dimension.
///
/// `shape` is the rank's local shape. With `placement` (the tensor's last placement):
/// `shard(0)` means the experts are split over the ep ranks, so dim 0 must be the rank's
/// count; `replicate` means every rank holds all experts, so dim 0 must be `numExperts`; any
/// other placement is an error naming the tensor and the placement. Without a placement
/// either count is accepted. Errors name the tensor by `name`.
pub fn validate_expert_sharding(
    shape: &[usize],
    num_experts: usize,
    ep_size: usize,
    ep_rank: usize,
    name: &str,
    placement: Option<Placement>,
) -> Result<ExpertRange> {
    let range = expert_range_for_rank(num_experts, ep_size, ep_rank)?;
    let Some(&dim0) = shape.first() else {
        return Err(Error::type_error(name, "a tensor with an expert dimension (at least 1-d)", "a 0-d shape []"));
    };
    let all = ExpertRange { start: 0, end: num_experts };
    let sharded_ok = dim0 == range.len();
    let replicated_ok = dim0 == num_experts;
    let owned = format!("{} (experts {}..{} of epRank {ep_rank} with epSize {ep_size})", range.len(), range.start, range.end);
    match placement {
        Some(Placement::Shard(0)) if sharded_ok => Ok(range),
        Some(Placement::Shard(0)) => {
            Err(Error::range(name, format!("has {dim0} experts in dim 0 but is shard(0) over the ep ranks, so expected {owned}")))
        }
        Some(Placement::Replicate) if replicated_ok => Ok(all),
        Some(Placement::Replicate) => {
            Err(Error::range(name, format!("has {dim0} experts in dim 0 but is replicated, so expected all {num_experts}")))
        }
        Some(other) => Err(Error::range(
            name,
            format!("has unsupported placement {} for expert parallelism: expected shard(0) or replicate", other.name()),
        )),
        None if sharded_ok => Ok(range),
        None if replicated_ok => Ok(all),
        None => {
            Err(Error::range(name, format!("has {dim0} experts in dim 0, expected {owned} or {num_experts} (all experts, replicated)")))
        }
    }
}

/// Reads a shape given as JS numbers; `arg` names it in errors.
pub fn shape_arg(arg: &str, shape: &[f64]) -> Result<Vec<usize>> {
    shape.iter().enumerate().map(|(i, &d)| size_arg(&format!("{arg}[{i}]"), d)).collect()
}

/// Reads a list of placements (`'replicate'` or `'shard(d)'`).
pub fn placements_arg(placements: &[String]) -> Result<Vec<Placement>> {
    placements.iter().enumerate().map(|(i, p)| Placement::parse(&format!("placements[{i}]"), p)).collect()
}

/// A named mesh axis and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshAxis {
    pub name: String,
    pub size: usize,
}

/// Reads a mesh from parallel lists of axis names and sizes.
pub fn mesh_arg(names: &[String], sizes: &[f64]) -> Result<Vec<MeshAxis>> {
    if names.len() != sizes.len() {
        return Err(Error::range("mesh", format!("{} axis names but {} sizes", names.len(), sizes.len())));
    }
    let mut axes: Vec<MeshAxis> = Vec::with_capacity(names.len());
    for (i, (name, &size)) in names.iter().zip(sizes).enumerate() {
        let size = size_arg(&format!("mesh[{i}].size"), size)?;
        if size == 0 {
            return Err(Error::range(format!("mesh[{i}].size"), format!("axis '{name}' has size 0, expected at least 1")));
        }
        if axes.iter().any(|a| a.name == *name) {
            return Err(Error::range(format!("mesh[{i}].name"), format!("axis '{name}' appears twice")));
        }
        axes.push(MeshAxis { name: name.clone(), size });
    }
    Ok(axes)
}

/// A mesh with one placement per axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub mesh: Vec<MeshAxis>,
    pub placements: Vec<Placement>,
}

/// Placements of an expert tensor `[E, ...]` on an expert mesh (NeMo's
/// `create_dtensor_from_local`): `ep` shards dim 0; `ep_shard` shards dim 1 and
/// `ep_replicate` replicates, both only when `ep_shard` or `ep_replicate` has size > 1
/// (otherwise those axes are left out of the mesh). Any other axis name is an error.
pub fn expert_placements(mesh: &[MeshAxis]) -> Result<Placed> {
    let ep_sharded = mesh.iter().any(|a| (a.name == "ep_shard" || a.name == "ep_replicate") && a.size > 1);
    let mut out = Placed { mesh: Vec::new(), placements: Vec::new() };
    for (i, axis) in mesh.iter().enumerate() {
        let placement = match axis.name.as_str() {
            "ep" => Some(Placement::Shard(0)),
            "ep_shard" => ep_sharded.then_some(Placement::Shard(1)),
            "ep_replicate" => ep_sharded.then_some(Placement::Replicate),
            other => {
                return Err(Error::range(
                    format!("mesh[{i}].name"),
                    format!("'{other}' is not an expert mesh axis (expected 'ep', 'ep_shard' or 'ep_replicate')"),
                ));
            }
        };
        if let Some(p) = placement {
            out.mesh.push(axis.clone());
            out.placements.push(p);
        }
    }
    Ok(out)
}

/// Placements of each per-expert tensor after splitting a stacked expert tensor placed as
/// `placements` on `mesh` (NeMo's `split_experts_weights_dtensor_aware`): the `ep` axis and
/// its placement go away; `shard(d)` with `d > 0` becomes `shard(d - 1)`, `shard(0)`
/// becomes `replicate`. `None` (a plain local tensor) when the mesh has no `ep` axis or no
/// remaining axis has size > 1.
pub fn split_placements(mesh: &[MeshAxis], placements: &[Placement]) -> Result<Option<Placed>> {
    if placements.len() != mesh.len() {
        return Err(Error::range("placements", format!("{} placements for a mesh of {} axes", placements.len(), mesh.len())));
    }
    let Some(ep) = mesh.iter().position(|a| a.name == "ep") else { return Ok(None) };
    let rest: Vec<usize> = (0..mesh.len()).filter(|&i| i != ep).collect();
    if !rest.iter().any(|&i| mesh[i].size > 1) {
        return Ok(None);
    }
    let placements = rest
        .iter()
        .map(|&i| match placements[i] {
            Placement::Shard(0) => Placement::Replicate,
            Placement::Shard(d) => Placement::Shard(d - 1),
            Placement::Replicate => Placement::Replicate,
        })
        .collect();
    Ok(Some(Placed { mesh: rest.iter().map(|&i| mesh[i].clone()).collect(), placements }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::tensor::Data;

    #[test]
    fn ranges_partition_the_experts() {
        for e in [0usize, 1, 7, 8, 60, 257] {
            for w in [1usize, 2, 3, 4, 7, 8, 64] {
                let mut next = 0;
                for r in 0..w {
                    let range = expert_range_for_rank(e, w, r).unwrap();
                    assert_eq!(range.start, next, "e={e} w={w} r={r}");
                    assert!(range.len() == e / w || range.len() == e / w + 1);
                    next = range.end;
                }
                assert_eq!(next, e);
            }
        }
        assert_eq!(expert_range_for_rank(10, 4, 1), Ok(ExpertRange { start: 3, end: 6 }));
        assert_eq!(expert_range_for_rank(10, 4, 3), Ok(ExpertRange { start: 8, end: 10 }));
        assert_eq!(expert_range_for_rank(1, 3, 2), Ok(ExpertRange { start: 1, end: 1 }));
    }

    #[test]
    fn rank_errors_name_the_option() {
        let err = expert_range_for_rank(8, 0, 0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RangeError);
        assert!(err.to_string().starts_with("epSize:"), "{err}");
        assert!(expert_range_for_rank(8, 2, 2).unwrap_err().to_string().starts_with("epRank: 2 is outside"));
        assert!(should_load_expert(8, 8, 2, 0).unwrap_err().to_string().starts_with("expertId:"));
        assert_eq!(should_load_expert(3, 8, 2, 0), Ok(true));
        assert_eq!(should_load_expert(4, 8, 2, 0), Ok(false));
    }

    #[test]
    fn split_copies_each_expert_with_its_global_id() {
        // 10 experts over 4 ranks: rank 2 owns 6..8. Stacked [2, 2, 1].
        let w: Vec<f32> = vec![1.0, 2.0, 3.0, f32::from_bits(0x7fc0_0001)];
        let t = TensorRef::of("stacked", vec![2, 2, 1], &w).unwrap();
        let parts = split_expert_weights(&t, 10, 4, 2).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0, 6);
        assert_eq!(parts[0].1.shape, vec![2, 1]);
        assert_eq!(parts[0].1.data, Data::F32(vec![1.0, 2.0]));
        assert_eq!(parts[1].0, 7);
        let Data::F32(v) = &parts[1].1.data else { unreachable!() };
        assert_eq!(v[1].to_bits(), 0x7fc0_0001);

        let err = split_expert_weights(&t, 10, 4, 0).unwrap_err();
        assert!(err.to_string().starts_with("stacked.shape[0]: expected 3 (experts 0..3"), "{err}");
        let i = [1i64, 2];
        let ti = TensorRef::of("stacked", vec![2], &i[..]).unwrap();
        assert_eq!(split_expert_weights(&ti, 2, 1, 0).unwrap_err().kind(), ErrorKind::TypeError);
        let b = [1u8, 0, 1];
        let tb = TensorRef::new("stacked", DType::Bool, vec![3], &b).unwrap();
        let parts = split_expert_weights(&tb, 3, 1, 0).unwrap();
        assert_eq!(parts[2].1.shape, Vec::<usize>::new());
        assert_eq!(parts[2].1.data, Data::Bool(vec![1]));
    }

    #[test]
    fn validation_accepts_owned_or_all_experts_and_names_the_tensor() {
        assert_eq!(validate_expert_sharding(&[3, 4], 10, 4, 0, "w", None), Ok(ExpertRange { start: 0, end: 3 }));
        assert_eq!(validate_expert_sharding(&[10, 4], 10, 4, 3, "w", None), Ok(ExpertRange { start: 0, end: 10 }));
        let err = validate_expert_sharding(&[4, 4], 10, 4, 0, "layers.0.w1", None).unwrap_err();
        assert!(err.to_string().starts_with("layers.0.w1: has 4 experts in dim 0, expected 3"), "{err}");
        let err = validate_expert_sharding(&[10], 10, 4, 0, "w", Some(Placement::Shard(0))).unwrap_err();
        assert!(err.to_string().contains("shard(0)"), "{err}");
        let err = validate_expert_sharding(&[3], 10, 4, 0, "w", Some(Placement::Replicate)).unwrap_err();
        assert!(err.to_string().contains("replicated"), "{err}");
        let err = validate_expert_sharding(&[3], 10, 4, 0, "w", Some(Placement::Shard(1))).unwrap_err();
        assert!(err.to_string().starts_with("w: has unsupported placement shard(1)"), "{err}");
        assert_eq!(validate_expert_sharding(&[], 10, 4, 0, "w", None).unwrap_err().kind(), ErrorKind::TypeError);
    }

    fn mesh(axes: &[(&str, usize)]) -> Vec<MeshAxis> {
        axes.iter().map(|&(n, s)| MeshAxis { name: n.into(), size: s }).collect()
    }

    #[test]
    fn placements_follow_the_expert_mesh() {
        let p = expert_placements(&mesh(&[("ep", 4), ("ep_shard", 2), ("ep_replicate", 1)])).unwrap();
        assert_eq!(p.placements, vec![Placement::Shard(0), Placement::Shard(1), Placement::Replicate]);
        assert_eq!(p.mesh.len(), 3);
        let p = expert_placements(&mesh(&[("ep_replicate", 1), ("ep", 4), ("ep_shard", 1)])).unwrap();
        assert_eq!(p.placements, vec![Placement::Shard(0)]);
        assert_eq!(p.mesh, mesh(&[("ep", 4)]));
        let err = expert_placements(&mesh(&[("ep", 4), ("tp", 2)])).unwrap_err();
        assert!(err.to_string().starts_with("mesh[1].name: 'tp'"), "{err}");

        let split = split_placements(&mesh(&[("ep", 4), ("ep_shard", 2)]), &[Placement::Shard(0), Placement::Shard(1)]).unwrap().unwrap();
        assert_eq!(split.mesh, mesh(&[("ep_shard", 2)]));
        assert_eq!(split.placements, vec![Placement::Shard(0)]);
        let split = split_placements(&mesh(&[("dp", 2), ("ep", 4)]), &[Placement::Shard(0), Placement::Shard(0)]).unwrap().unwrap();
        assert_eq!(split.placements, vec![Placement::Replicate]);
        assert_eq!(split_placements(&mesh(&[("ep", 4), ("ep_shard", 1)]), &[Placement::Shard(0), Placement::Shard(1)]), Ok(None));
        assert_eq!(split_placements(&mesh(&[("dp", 4)]), &[Placement::Shard(0)]), Ok(None));
        assert_eq!(Placement::parse("p", "shard(12)"), Ok(Placement::Shard(12)));
        assert_eq!(Placement::parse("p", "shard(-1)").unwrap_err().kind(), ErrorKind::TypeError);
        assert_eq!(Placement::parse("p", "shard()").unwrap_err().kind(), ErrorKind::TypeError);
    }
}
