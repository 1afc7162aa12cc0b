//! Checkpoints in the safetensors format (Hugging Face's `safetensors` crate parses the
//! header and writes files): one file, or a sharded checkpoint (`model.safetensors.index.json`
//! and its shard files, opened only when a wanted tensor lives there), and the expert key
//! schemes of the model families mapped to the stacked layout of the grouped experts.
//!
//! - this module: byte sources (counted reads), the header of one file, writing files;
//! - [`multi`]: [`Checkpoint`], tensors by name over one file or the shards of an index;
//! - [`experts`]: the expert key schemes (stacked, Hugging Face per-expert, Mixtral, GPT-OSS,
//!   Llama 4, transformers 5 fused, Granite), per-rank loads, stack / unstack.
//!
//! Every read goes through a [`ByteSource`], which counts it: a load reports exactly the
//! bytes it read (each opened file's 8-byte length and header, then the wanted tensors or
//! rows), so callers and tests can see that nothing else was touched.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use safetensors::tensor::{Metadata, TensorInfo};

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorRef};

mod experts;
mod multi;

pub use experts::{load_experts, stack_experts, unstack_experts, ExpertFormat, LoadedExperts};
pub use multi::{Checkpoint, Opener, TensorSummary, INDEX_FILE, SINGLE_FILE};

// ---------------------------------------------------------------------------------------
// Byte sources.

/// Where checkpoint bytes come from. Every read is counted, so callers (and tests) can see
/// that a per-rank load touched only the header and its own experts.
pub trait ByteSource {
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// Fills `buf` from `offset`; an error names the source.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Bytes read so far.
    fn bytes_read(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<S: ByteSource + ?Sized> ByteSource for &mut S {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf)
    }
    fn bytes_read(&self) -> u64 {
        (**self).bytes_read()
    }
}

/// The error of a read past the end of a source.
pub fn out_of_range(len: u64, offset: u64, n: usize) -> Error {
    Error::range("bytes", format!("the checkpoint ends at byte {len}, a read needs {offset}..{}", offset.saturating_add(n as u64)))
}

/// A checkpoint held in memory.
pub struct SliceSource<'a> {
    bytes: &'a [u8],
    read: u64,
}

impl<'a> SliceSource<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        SliceSource { bytes, read: 0 }
    }
}

impl ByteSource for SliceSource<'_> {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.len());
        let Some(end) = end else {
            return Err(out_of_range(self.len(), offset, buf.len()));
        };
        buf.copy_from_slice(&self.bytes[offset as usize..end as usize]);
        self.read += buf.len() as u64;
        Ok(())
    }

    fn bytes_read(&self) -> u64 {
        self.read
    }
}

/// A checkpoint file, read with seek + read (not on wasm32, which has no files).
#[cfg(not(target_arch = "wasm32"))]
pub struct FileSource {
    file: std::fs::File,
    path: String,
    len: u64,
    read: u64,
}

#[cfg(not(target_arch = "wasm32"))]
impl FileSource {
    pub fn open(path: &str) -> Result<FileSource> {
        let file = std::fs::File::open(path).map_err(|e| Error::range("path", format!("cannot open '{path}': {e}")))?;
        let meta = file.metadata().map_err(|e| Error::range("path", format!("cannot stat '{path}': {e}")))?;
        if meta.is_dir() {
            return Err(Error::range("path", format!("cannot open '{path}': a directory (this call wants a file)")));
        }
        Ok(FileSource { file, path: path.to_string(), len: meta.len(), read: 0 })
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl ByteSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        if offset.checked_add(buf.len() as u64).is_none_or(|e| e > self.len) {
            return Err(out_of_range(self.len, offset, buf.len()));
        }
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.read_exact(buf))
            .map_err(|e| Error::range("path", format!("reading {} bytes at {offset} of '{}': {e}", buf.len(), self.path)))?;
        self.read += buf.len() as u64;
        Ok(())
    }

    fn bytes_read(&self) -> u64 {
        self.read
    }
}

// ---------------------------------------------------------------------------------------
// The header.

/// One tensor of a checkpoint file: where its bytes are (absolute offsets in the file).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    /// The dtype, when moe-dispatch can return it (F32, BF16, F16, I32, I64, BOOL); `None`
    /// for the others (F64, U8, F8_E4M3, ...), which are listed but cannot be loaded.
    pub dtype: Option<DType>,
    /// The safetensors name of the dtype (`"BF16"`, `"F8_E4M3"`, ...).
    pub st_dtype: String,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

impl Entry {
    /// The dtype's facade name (`bfloat16`), or the safetensors name for others (`F8_E4M3`).
    pub fn dtype_name(&self) -> String {
        self.dtype.map_or_else(|| self.st_dtype.clone(), |d| d.name().to_string())
    }

    /// The dtype, or a TypeError naming the tensor when moe-dispatch cannot return it.
    pub fn loadable_dtype(&self) -> Result<DType> {
        self.dtype
            .ok_or_else(|| Error::type_error(format!("{}.dtype", self.name), "F32, BF16, F16, I32, I64 or BOOL", self.st_dtype.clone()))
    }
}

/// A parsed safetensors header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Tensors by offset.
    pub tensors: Vec<Entry>,
    /// The `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
    /// `8 + header length`: the bytes before the data.
    pub data_start: u64,
    index: HashMap<String, usize>,
}

impl Header {
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
}

/// The safetensors header cap (100 MB, as the safetensors crate).
const MAX_HEADER: u64 = 100_000_000;

fn dtype_of(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::BF16 => DType::BF16,
        S::F16 => DType::F16,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        S::BOOL => DType::Bool,
        _ => return None,
    })
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match d {
        DType::F32 => S::F32,
        DType::BF16 => S::BF16,
        DType::F16 => S::F16,
        DType::I32 => S::I32,
        DType::I64 => S::I64,
        DType::Bool => S::BOOL,
    }
}

/// Reads and checks the header: the 8-byte length, the JSON (parsed by the safetensors
/// crate, which checks that the tensors tile the data without gaps), and that the source
/// holds all the data the header describes. Reads only `8 + header length` bytes.
pub fn read_header<S: ByteSource + ?Sized>(src: &mut S) -> Result<Header> {
    let total = src.len();
    if total < 8 {
        return Err(Error::range("checkpoint", format!("not a safetensors file: {total} bytes, the header length alone takes 8")));
    }
    let mut n = [0u8; 8];
    src.read_at(0, &mut n)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > total - 8 {
        return Err(Error::range("checkpoint", format!("not a safetensors file: a header of {n} bytes does not fit in {total} bytes")));
    }
    let mut json = crate::alloc::try_vec(0u8, n as usize, "checkpoint")?;
    src.read_at(8, &mut json)?;
    let meta: Metadata = serde_json::from_slice(&json).map_err(|e| Error::range("checkpoint", format!("not a safetensors header: {e}")))?;
    let data_start = 8 + n;
    let data_len = meta.data_len() as u64;
    if data_start + data_len > total {
        return Err(Error::range(
            "checkpoint",
            format!("truncated: the header describes {data_len} bytes of data after byte {data_start}, the checkpoint has {total} bytes"),
        ));
    }
    let infos: HashMap<String, &TensorInfo> = meta.tensors().into_iter().collect();
    let mut tensors = Vec::with_capacity(infos.len());
    for name in meta.offset_keys() {
        let info = infos[&name];
        tensors.push(Entry {
            dtype: dtype_of(info.dtype),
            st_dtype: format!("{:?}", info.dtype),
            shape: info.shape.clone(),
            start: data_start + info.data_offsets.0 as u64,
            end: data_start + info.data_offsets.1 as u64,
            name,
        });
    }
    let index = tensors.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect();
    let metadata = meta.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    Ok(Header { tensors, metadata, data_start, index })
}

/// Bytes per row along dim 0 of an entry of a loadable dtype (the whole tensor for a scalar).
fn row_bytes(e: &Entry, size: usize) -> u64 {
    e.shape.iter().skip(1).product::<usize>() as u64 * size as u64
}

/// The byte range of rows `rows` (dim 0) of an entry, or of all of it; checked against its shape.
fn byte_range(e: &Entry, rows: Option<Range<usize>>) -> Result<(u64, u64)> {
    match rows {
        None => Ok((e.start, e.end - e.start)),
        Some(r) => {
            let size = e.loadable_dtype()?.size();
            if e.shape.is_empty() || r.start > r.end || r.end > e.shape[0] {
                return Err(Error::Internal(format!("rows {}..{} of {} {:?}", r.start, r.end, e.name, e.shape)));
            }
            let rb = row_bytes(e, size);
            Ok((e.start + r.start as u64 * rb, r.len() as u64 * rb))
        }
    }
}

/// A tensor read from a checkpoint: a [`Tensor`], or an int64 tensor's little-endian bytes
/// (the core's tensors have no int64 outputs; the bindings hand these to JavaScript as BigInt64Array).
#[derive(Debug, Clone, PartialEq)]
pub enum Loaded {
    Tensor(Tensor),
    Int64 { shape: Vec<usize>, bytes: Vec<u8> },
}

impl Loaded {
    pub fn shape(&self) -> &[usize] {
        match self {
            Loaded::Tensor(t) => &t.shape,
            Loaded::Int64 { shape, .. } => shape,
        }
    }
}

/// Reads an entry (all of it) from `src` straight into a buffer of its element type.
fn read_entry<S: ByteSource + ?Sized>(src: &mut S, e: &Entry) -> Result<Loaded> {
    let dtype = e.loadable_dtype()?;
    let (start, len) = (e.start, (e.end - e.start) as usize);
    let numel = len / dtype.size();
    let shape = e.shape.clone();
    Ok(match dtype {
        DType::F32 => {
            let mut v = crate::alloc::try_vec(0f32, numel, &e.name)?;
            src.read_at(start, bytemuck::cast_slice_mut(&mut v))?;
            Loaded::Tensor(Tensor::f32(shape, v))
        }
        DType::BF16 | DType::F16 => {
            let mut v = crate::alloc::try_vec(0u16, numel, &e.name)?;
            src.read_at(start, bytemuck::cast_slice_mut(&mut v))?;
            Loaded::Tensor(Tensor::u16(dtype, shape, v))
        }
        DType::I32 => {
            let mut v = crate::alloc::try_vec(0i32, numel, &e.name)?;
            src.read_at(start, bytemuck::cast_slice_mut(&mut v))?;
            Loaded::Tensor(Tensor::i32(shape, v))
        }
        DType::Bool => {
            let mut v = crate::alloc::try_vec(0u8, numel, &e.name)?;
            src.read_at(start, &mut v)?;
            if let Some(i) = v.iter().position(|&b| b > 1) {
                return Err(Error::range(e.name.as_str(), format!("a BOOL tensor holds {} at element {i}", v[i])));
            }
            Loaded::Tensor(Tensor::bool(shape, v))
        }
        DType::I64 => {
            let mut v = crate::alloc::try_vec(0u8, len, &e.name)?;
            src.read_at(start, &mut v)?;
            Loaded::Int64 { shape, bytes: v }
        }
    })
}

fn tensor_bytes(t: &Tensor) -> &[u8] {
    match &t.data {
        crate::tensor::Data::F32(v) => bytemuck::cast_slice(v),
        crate::tensor::Data::U16(v) => bytemuck::cast_slice(v),
        crate::tensor::Data::I32(v) => bytemuck::cast_slice(v),
        crate::tensor::Data::Bool(v) => v,
    }
}

/// Reads every tensor of one file (or the named ones; a missing name is a RangeError naming
/// it and listing the checkpoint's names nearest to it). See [`Checkpoint::load`].
pub fn load<S: ByteSource + ?Sized>(src: &mut S, names: Option<&[String]>) -> Result<Vec<(String, Loaded)>> {
    Checkpoint::single("", Box::new(src))?.load(names)
}

/// The names of `all` nearest to `name`: those sharing the longest common prefix with it
/// (up to `max`, sorted), and how many share it in all.
pub fn nearest<'n>(name: &str, all: impl Iterator<Item = &'n str>, max: usize) -> (Vec<&'n str>, usize) {
    let common = |a: &str| a.bytes().zip(name.bytes()).take_while(|(x, y)| x == y).count();
    let mut best = 0usize;
    let mut group: Vec<&str> = Vec::new();
    for n in all {
        let c = common(n);
        if c > best {
            best = c;
            group.clear();
        }
        if c == best {
            group.push(n);
        }
    }
    group.sort_unstable();
    let total = group.len();
    group.truncate(max);
    (group, total)
}

/// "a, b, c" or "a, b, ... (12 in all)".
pub(crate) fn list_names(names: &[&str], total: usize) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    if total > names.len() {
        format!("{}, ... ({total} in all)", quoted.join(", "))
    } else {
        quoted.join(", ")
    }
}

/// A tensor to write: name, dtype, shape and little-endian bytes.
struct Out<'a> {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

impl safetensors::View for Out<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes tensors (and optional `__metadata__` strings) as a safetensors buffer, through the
/// safetensors crate (tensors ordered by dtype alignment, then name; header padded to 8).
/// Names must be unique and non-empty (a RangeError naming the duplicate).
pub fn save(tensors: &[(String, TensorRef)], metadata: &[(String, String)]) -> Result<Vec<u8>> {
    let mut seen = HashMap::new();
    for (i, (name, _)) in tensors.iter().enumerate() {
        if name.is_empty() || name == "__metadata__" {
            return Err(Error::range(format!("names[{i}]"), format!("'{name}' cannot name a tensor")));
        }
        if let Some(j) = seen.insert(name.as_str(), i) {
            return Err(Error::range(name.as_str(), format!("given twice (names[{j}] and names[{i}])")));
        }
    }
    let views = tensors.iter().map(|(name, t)| (name.clone(), Out { dtype: st_dtype(t.dtype), shape: t.shape.clone(), bytes: t.bytes() }));
    let meta = if metadata.is_empty() { None } else { Some(metadata.iter().cloned().collect()) };
    safetensors::serialize(views, meta).map_err(|e| Error::range("tensors", format!("cannot write the checkpoint: {e}")))
}

/// [`save`] for owned tensors.
pub fn save_owned(tensors: &[(String, Tensor)], metadata: &[(String, String)]) -> Result<Vec<u8>> {
    let refs: Vec<(String, TensorRef)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), TensorRef::new("tensor", t.dtype, t.shape.clone(), tensor_bytes(t))?)))
        .collect::<Result<_>>()?;
    save(&refs, metadata)
}

/// Re-labels an error about the binding's generic argument `arg` (e.g. `tensors`) with the
/// checkpoint key it was about, so list arguments still name what was wrong.
pub fn for_key(e: Error, arg: &str, key: &str) -> Error {
    let relabel = |a: String| match a.strip_prefix(arg) {
        Some(rest) => format!("{key}{rest}"),
        None => a,
    };
    match e {
        Error::Type { arg: a, expected, got } => Error::Type { arg: relabel(a), expected, got },
        Error::Range { arg: a, message } => Error::Range { arg: relabel(a), message },
        other => other,
    }
}

/// Pairs names with tensors of a list argument (`names[i]` names `tensors[i]`).
pub fn named<'a>(names: &[String], tensors: Vec<TensorRef<'a>>) -> Result<Vec<(String, TensorRef<'a>)>> {
    if names.len() != tensors.len() {
        return Err(Error::range("names", format!("{} names for {} tensors", names.len(), tensors.len())));
    }
    Ok(names.iter().cloned().zip(tensors).collect())
}

/// `{prefix}.{rest}` (just `rest` for an empty prefix).
pub fn key(prefix: &str, rest: &str) -> String {
    if prefix.is_empty() {
        rest.to_string()
    } else {
        format!("{prefix}.{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Data;

    fn f32s(t: &Loaded) -> &[f32] {
        match t {
            Loaded::Tensor(Tensor { data: Data::F32(v), .. }) => v,
            _ => panic!("f32"),
        }
    }

    #[test]
    fn save_and_load_round_trip_with_metadata_and_int64() {
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let b = [1i32, -2, 3];
        let c = [7i64, -1, 1 << 40];
        let tensors = vec![
            ("a".to_string(), TensorRef::of("a", vec![2, 3], &a).unwrap()),
            ("b".to_string(), TensorRef::of("b", vec![3], &b).unwrap()),
            ("c".to_string(), TensorRef::new("c", DType::I64, vec![3], bytemuck::cast_slice(&c)).unwrap()),
        ];
        let bytes = save(&tensors, &[("format".into(), "pt".into())]).unwrap();
        // The safetensors crate itself reads what we wrote.
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().shape(), &[2, 3]);
        let mut src = SliceSource::new(&bytes);
        let header = read_header(&mut src).unwrap();
        assert_eq!(header.metadata.get("format").map(String::as_str), Some("pt"));
        assert_eq!(src.bytes_read(), header.data_start);
        let loaded = load(&mut SliceSource::new(&bytes), None).unwrap();
        let a2 = &loaded.iter().find(|(n, _)| n == "a").unwrap().1;
        assert_eq!(f32s(a2), &a[..]);
        let c2 = &loaded.iter().find(|(n, _)| n == "c").unwrap().1;
        assert_eq!(c2, &Loaded::Int64 { shape: vec![3], bytes: bytemuck::cast_slice(&c).to_vec() });
        let err = load(&mut SliceSource::new(&bytes), Some(&["cc".to_string()])).unwrap_err();
        assert_eq!(err.to_string(), "cc: no such tensor in the checkpoint (3 tensors; the nearest: 'c')");
        let err = read_header(&mut SliceSource::new(&bytes[..bytes.len() - 1])).unwrap_err();
        assert!(err.to_string().starts_with("checkpoint: truncated"), "{err}");
        let err = save(&[tensors[0].clone(), tensors[0].clone()], &[]).unwrap_err();
        assert!(err.to_string().starts_with("a: given twice"), "{err}");
    }

    #[test]
    fn unsupported_dtypes_are_listed_not_loaded() {
        // A hand-written header with an F8_E4M3 tensor beside an F32 one.
        let json = br#"{"q":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]},"s":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#;
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(json);
        file.extend_from_slice(&[1, 2, 0, 0, 128, 63]);
        let header = read_header(&mut SliceSource::new(&file)).unwrap();
        assert_eq!(header.get("q").unwrap().dtype_name(), "F8_E4M3");
        let got = load(&mut SliceSource::new(&file), Some(&["s".to_string()])).unwrap();
        assert_eq!(f32s(&got[0].1), &[1.0]);
        let err = load(&mut SliceSource::new(&file), Some(&["q".to_string()])).unwrap_err();
        assert_eq!(err.to_string(), "q.dtype: expected F32, BF16, F16, I32, I64 or BOOL, got F8_E4M3");
    }

    #[test]
    fn nearest_names_share_the_longest_prefix() {
        let all = [
            "model.layers.0.mlp.gate.weight",
            "model.layers.0.mlp.experts.0.up_proj.weight",
            "model.layers.0.mlp.experts.1.up_proj.weight",
            "lm_head.weight",
        ];
        let (near, total) = nearest("model.layers.0.mlp.experts.7.up_proj.weight", all.iter().copied(), 10);
        assert_eq!((near, total), (vec!["model.layers.0.mlp.experts.0.up_proj.weight", "model.layers.0.mlp.experts.1.up_proj.weight"], 2));
        let (near, total) = nearest("model.layers.0.mlp.router.weight", all.iter().copied(), 2);
        assert_eq!(total, 3);
        assert_eq!(near.len(), 2);
        let (near, total) = nearest("zzz", all.iter().copied(), 10);
        assert_eq!((near.len(), total), (4, 4));
    }
}
