//! A checkpoint as tensors by name: one safetensors file, or a sharded checkpoint
//! (`model.safetensors.index.json`: `{ "metadata": {...}, "weight_map": { tensor: file } }`
//! and its shard files). Shard files are opened only when a tensor the call needs lives
//! there, through an [`Opener`] (files next to the index, or shards held in memory), and
//! every read of every file is counted.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use super::{byte_range, list_names, nearest, read_entry, read_header, ByteSource, Entry, Header, Loaded};
use crate::error::{Error, Result};

/// The index file of a sharded checkpoint, as `save_pretrained` names it.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The file of an unsharded checkpoint, as `save_pretrained` names it.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Opens a shard file by the name the index gives it: `Ok(None)` when the caller does not
/// have it (in-memory shards), an error when it cannot be opened.
pub type Opener<'a> = Box<dyn FnMut(&str) -> Result<Option<Box<dyn ByteSource + 'a>>> + 'a>;

/// The index's cap (the safetensors crate's header cap: 100 MB).
const MAX_INDEX: usize = 100_000_000;

struct File<'a> {
    name: String,
    src: Option<Box<dyn ByteSource + 'a>>,
    header: Option<Header>,
}

/// One tensor as `checkpointInfo` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSummary {
    pub name: String,
    /// The facade's dtype name, or the safetensors name of one it does not return (`F8_E4M3`).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// The file that holds it (`""` for a single file given as bytes).
    pub file: String,
}

/// Tensors by name over one file or the shards of an index (see the module docs).
pub struct Checkpoint<'a> {
    files: Vec<File<'a>>,
    /// Every tensor's name, in listing order (a file's offset order; the index's name order).
    names: Vec<String>,
    file_of: HashMap<String, usize>,
    opener: Option<Opener<'a>>,
    /// The index's `metadata` (values that are not strings as JSON).
    index_metadata: Vec<(String, String)>,
}

impl<'a> Checkpoint<'a> {
    /// One safetensors file (`file` names it in listings); its header is read now.
    pub fn single(file: &str, mut src: Box<dyn ByteSource + 'a>) -> Result<Checkpoint<'a>> {
        let header = read_header(&mut *src)?;
        let names: Vec<String> = header.tensors.iter().map(|e| e.name.clone()).collect();
        let file_of = names.iter().map(|n| (n.clone(), 0)).collect();
        Ok(Checkpoint {
            files: vec![File { name: file.to_string(), src: Some(src), header: Some(header) }],
            names,
            file_of,
            opener: None,
            index_metadata: Vec::new(),
        })
    }

    /// A sharded checkpoint: the index json's bytes and a way to open its shard files (none is
    /// opened now).
    pub fn sharded(index: &[u8], opener: Opener<'a>) -> Result<Checkpoint<'a>> {
        let (weight_map, index_metadata) = parse_index(index)?;
        let mut files: Vec<File> = Vec::new();
        let mut file_idx: HashMap<String, usize> = HashMap::new();
        let mut names = Vec::with_capacity(weight_map.len());
        let mut file_of = HashMap::with_capacity(weight_map.len());
        for (tensor, file) in weight_map {
            let i = *file_idx.entry(file.clone()).or_insert_with(|| {
                files.push(File { name: file.clone(), src: None, header: None });
                files.len() - 1
            });
            file_of.insert(tensor.clone(), i);
            names.push(tensor);
        }
        Ok(Checkpoint { files, names, file_of, opener: Some(opener), index_metadata })
    }

    /// A checkpoint on disk: a `.safetensors` file, an index `.json` (its shards next to it), or
    /// a directory holding `model.safetensors.index.json` or `model.safetensors`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open_path<'p>(path: &str) -> Result<Checkpoint<'p>> {
        use std::path::{Path, PathBuf};

        use super::FileSource;
        let p = Path::new(path);
        let meta = std::fs::metadata(p).map_err(|e| Error::range("path", format!("cannot open '{path}': {e}")))?;
        let (index, single): (Option<PathBuf>, Option<PathBuf>) = if meta.is_dir() {
            let (idx, one) = (p.join(INDEX_FILE), p.join(SINGLE_FILE));
            if idx.is_file() {
                (Some(idx), None)
            } else if one.is_file() {
                (None, Some(one))
            } else {
                let mut found: Vec<String> = std::fs::read_dir(p)
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .filter(|n| n.ends_with(".safetensors") || n.ends_with(".json"))
                            .collect()
                    })
                    .unwrap_or_default();
                found.sort();
                let listed: Vec<&str> = found.iter().map(String::as_str).take(10).collect();
                return Err(Error::range(
                    "path",
                    format!(
                        "'{path}' is a directory without {INDEX_FILE} or {SINGLE_FILE} (its .safetensors and .json files: {}); pass the path of a .safetensors file or of an index .json",
                        if found.is_empty() { "none".to_string() } else { list_names(&listed, found.len()) }
                    ),
                ));
            }
        } else if path.ends_with(".json") {
            (Some(p.to_path_buf()), None)
        } else {
            (None, Some(p.to_path_buf()))
        };
        if let Some(file) = single {
            let shown = file.to_string_lossy().into_owned();
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            return Checkpoint::single(&name, Box::new(FileSource::open(&shown)?));
        }
        let index = index.unwrap_or_default();
        let shown = index.to_string_lossy().into_owned();
        let bytes = read_small_file(&index, &shown)?;
        let base = index.parent().map(Path::to_path_buf).unwrap_or_default();
        let opener: Opener<'p> = Box::new(move |file: &str| {
            let full = base.join(file);
            Ok(Some(Box::new(FileSource::open(&full.to_string_lossy())?) as Box<dyn ByteSource>))
        });
        Checkpoint::sharded(&bytes, opener).map_err(|e| relabel_index(e, &shown))
    }

    /// Whether the tensors come from an index (shards) rather than one file.
    pub fn is_sharded(&self) -> bool {
        self.opener.is_some()
    }

    /// Every tensor's name (from the header or the index: nothing is opened).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.file_of.contains_key(name)
    }

    /// The file that holds `name` (as the index names it).
    pub fn file_name(&self, name: &str) -> Option<&str> {
        self.file_of.get(name).map(|&i| self.files[i].name.as_str())
    }

    /// The entry of `name` if its file is already open (never opens one).
    pub fn open_entry(&self, name: &str) -> Option<&Entry> {
        let &i = self.file_of.get(name)?;
        self.files[i].header.as_ref()?.get(name)
    }

    /// Opens file `i` (for `tensor`, named in errors) and reads its header, once.
    fn open_file(&mut self, i: usize, tensor: &str) -> Result<()> {
        if self.files[i].header.is_some() {
            return Ok(());
        }
        let file = self.files[i].name.clone();
        let opener = self.opener.as_mut().ok_or_else(|| Error::Internal(format!("file '{file}' has no header and no opener")))?;
        let context = |e: Error| -> Error {
            let msg = match &e {
                Error::Range { arg, message } if arg == "path" || arg == "checkpoint" || arg == "bytes" => message.clone(),
                other => other.to_string(),
            };
            Error::range(file.as_str(), format!("the shard holding '{tensor}': {msg}"))
        };
        let Some(mut src) = opener(&file).map_err(context)? else {
            return Err(Error::range(
                file.as_str(),
                format!("this shard holds '{tensor}', which this call needs, and is not among the given shards"),
            ));
        };
        let header = read_header(&mut *src).map_err(context)?;
        self.files[i].src = Some(src);
        self.files[i].header = Some(header);
        Ok(())
    }

    /// The entry of `name`, opening its file if needed. `Ok(None)`: no such tensor. A tensor
    /// the index lists but its shard's header lacks is a RangeError.
    pub fn entry(&mut self, name: &str) -> Result<Option<&Entry>> {
        let Some(&i) = self.file_of.get(name) else { return Ok(None) };
        self.open_file(i, name)?;
        let file = &self.files[i];
        let header = file.header.as_ref().ok_or_else(|| Error::Internal("header".into()))?;
        match header.get(name) {
            Some(e) => Ok(Some(e)),
            None => {
                let (near, total) = nearest(name, header.tensors.iter().map(|e| e.name.as_str()), 10);
                Err(Error::range(
                    name,
                    format!(
                        "the index puts it in '{}', whose header does not have it ({} tensors; the nearest: {})",
                        file.name,
                        header.tensors.len(),
                        if total == 0 { "none".into() } else { list_names(&near, total) }
                    ),
                ))
            }
        }
    }

    /// The entry of `name`, or the RangeError of a missing tensor.
    pub fn expect_entry(&mut self, name: &str) -> Result<Entry> {
        if !self.contains(name) {
            return Err(self.missing(name));
        }
        self.entry(name)?.cloned().ok_or_else(|| Error::Internal(format!("{name} listed but not found")))
    }

    /// The error of a name the checkpoint does not have: the names nearest to it.
    pub fn missing(&self, name: &str) -> Error {
        let (near, total) = nearest(name, self.names(), 10);
        let listed = if total == 0 { "none".to_string() } else { list_names(&near, total) };
        Error::range(name, format!("no such tensor in the checkpoint ({} tensors; the nearest: {listed})", self.names.len()))
    }

    /// Reads rows `rows` (dim 0) of `name`, or all of it, into `buf` (which must have the size).
    pub fn read_into(&mut self, name: &str, rows: Option<Range<usize>>, buf: &mut [u8]) -> Result<()> {
        let e = self.expect_entry(name)?;
        let (start, len) = byte_range(&e, rows)?;
        if len != buf.len() as u64 {
            return Err(Error::Internal(format!("{name}: {len} bytes into a buffer of {}", buf.len())));
        }
        let i = self.file_of[name];
        let src = self.files[i].src.as_mut().ok_or_else(|| Error::Internal("source".into()))?;
        src.read_at(start, buf)
    }

    /// Bytes read so far, over every file opened.
    pub fn bytes_read(&self) -> u64 {
        self.files.iter().filter_map(|f| f.src.as_ref()).map(|s| s.bytes_read()).sum()
    }

    /// Opens every file (headers only).
    fn open_all(&mut self) -> Result<()> {
        for i in 0..self.files.len() {
            if self.files[i].header.is_none() {
                let tensor = self.names.iter().find(|n| self.file_of[n.as_str()] == i).cloned().unwrap_or_default();
                self.open_file(i, &tensor)?;
            }
        }
        Ok(())
    }

    /// The names of every tensor in listing order: a file's offset order, file by file.
    fn all_in_file_order(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.names.len());
        for (i, f) in self.files.iter().enumerate() {
            if let Some(h) = &f.header {
                out.extend(h.tensors.iter().filter(|e| self.file_of.get(&e.name) == Some(&i)).map(|e| e.name.clone()));
            }
        }
        out
    }

    /// Reads the named tensors (all of them when `names` is `None`, file by file in offset
    /// order). Every name is looked up and every entry's dtype checked before any data is read.
    pub fn load(&mut self, names: Option<&[String]>) -> Result<Vec<(String, Loaded)>> {
        let wanted: Vec<String> = match names {
            Some(n) => {
                if let Some(m) = n.iter().find(|m| !self.contains(m)) {
                    return Err(self.missing(m));
                }
                n.to_vec()
            }
            None => {
                self.open_all()?;
                self.all_in_file_order()
            }
        };
        let mut entries = Vec::with_capacity(wanted.len());
        for n in &wanted {
            let e = self.expect_entry(n)?;
            e.loadable_dtype()?;
            entries.push(e);
        }
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let i = self.file_of[&e.name];
            let src = self.files[i].src.as_mut().ok_or_else(|| Error::Internal("source".into()))?;
            out.push((e.name.clone(), read_entry(&mut **src, &e)?));
        }
        Ok(out)
    }

    /// Every tensor's name, dtype, shape and file, from the headers (every file is opened).
    pub fn info(&mut self) -> Result<Vec<TensorSummary>> {
        self.open_all()?;
        let mut out = Vec::with_capacity(self.names.len());
        for name in self.all_in_file_order() {
            let i = self.file_of[&name];
            let e = self.open_entry(&name).ok_or_else(|| Error::Internal(name.clone()))?;
            out.push(TensorSummary { dtype: e.dtype_name(), shape: e.shape.clone(), file: self.files[i].name.clone(), name });
        }
        // Names the index lists that a shard's header lacks: an error, as for loads.
        if out.len() != self.names.len() {
            let listed: std::collections::HashSet<&str> = out.iter().map(|t| t.name.as_str()).collect();
            if let Some(n) = self.names.iter().find(|n| !listed.contains(n.as_str())).cloned() {
                self.entry(&n)?;
            }
        }
        Ok(out)
    }

    /// The `__metadata__` strings of the files opened so far (the first file's value wins),
    /// then the index's `metadata` (its non-string values as JSON).
    pub fn metadata(&self) -> Vec<(String, String)> {
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        for f in &self.files {
            if let Some(h) = &f.header {
                for (k, v) in &h.metadata {
                    out.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
        for (k, v) in &self.index_metadata {
            out.entry(k.clone()).or_insert_with(|| v.clone());
        }
        out.into_iter().collect()
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn read_small_file(path: &std::path::Path, shown: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| Error::range("path", format!("cannot open '{shown}': {e}")))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_INDEX as u64 {
        return Err(Error::range("path", format!("'{shown}': an index of {len} bytes is over the {MAX_INDEX}-byte cap")));
    }
    let mut v = Vec::new();
    f.take(MAX_INDEX as u64 + 1).read_to_end(&mut v).map_err(|e| Error::range("path", format!("reading '{shown}': {e}")))?;
    Ok(v)
}

/// Index errors name the index file they came from.
#[cfg(not(target_arch = "wasm32"))]
fn relabel_index(e: Error, shown: &str) -> Error {
    match e {
        Error::Range { arg, message } if arg == "index" => Error::range(format!("index '{shown}'"), message),
        other => other,
    }
}

/// A shard file name of an index: a relative path without `..` (it is joined to the index's directory).
fn check_file_name(tensor: &str, file: &str) -> Result<()> {
    let bad = file.is_empty()
        || file.starts_with('/')
        || file.starts_with('\\')
        || file.contains('\0')
        || file.split(['/', '\\']).any(|c| c == "..")
        || file.get(1..2) == Some(":");
    if bad {
        return Err(Error::range(
            "index",
            format!("weight_map['{tensor}'] = '{file}' is not a shard file name (a relative path without '..')"),
        ));
    }
    Ok(())
}

/// The index json: `weight_map` (tensor -> shard file; required) and `metadata` (optional).
/// Pairs of strings: the index's `weight_map` (tensor, file) or its `metadata` (key, value).
type Pairs = Vec<(String, String)>;

pub(crate) fn parse_index(bytes: &[u8]) -> Result<(Pairs, Pairs)> {
    use serde_json::Value;
    if bytes.len() > MAX_INDEX {
        return Err(Error::range("index", format!("{} bytes is over the {MAX_INDEX}-byte cap of an index", bytes.len())));
    }
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::range("index", format!("not a safetensors index (model.safetensors.index.json): {e}")))?;
    let Value::Object(top) = v else {
        return Err(Error::range("index", "not a safetensors index: expected a JSON object { metadata, weight_map }"));
    };
    let Some(map) = top.get("weight_map") else {
        let keys: Vec<&str> = top.keys().map(String::as_str).take(10).collect();
        return Err(Error::range(
            "index",
            format!(
                "not a safetensors index: no 'weight_map' (its keys: {})",
                if keys.is_empty() { "none".into() } else { list_names(&keys, top.len()) }
            ),
        ));
    };
    let Value::Object(map) = map else {
        return Err(Error::range("index", "weight_map: expected an object { tensor name: shard file }"));
    };
    let mut weight_map = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let Value::String(file) = file else {
            return Err(Error::range("index", format!("weight_map['{tensor}']: expected a shard file name (a string), got {file}")));
        };
        check_file_name(tensor, file)?;
        weight_map.push((tensor.clone(), file.clone()));
    }
    let mut metadata = Vec::new();
    match top.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                metadata.push((k.clone(), if let Value::String(s) = v { s.clone() } else { v.to_string() }));
            }
        }
        Some(other) => return Err(Error::range("index", format!("metadata: expected an object, got {other}"))),
    }
    Ok((weight_map, metadata))
}

#[cfg(test)]
mod tests {
    use super::super::{save, SliceSource};
    use super::*;
    use crate::tensor::{DType, TensorRef};

    fn file(tensors: &[(&str, Vec<f32>)]) -> Vec<u8> {
        let refs: Vec<(String, TensorRef)> = tensors
            .iter()
            .map(|(n, v)| (n.to_string(), TensorRef::new("t", DType::F32, vec![v.len()], bytemuck::cast_slice(v)).unwrap()))
            .collect();
        save(&refs, &[("format".into(), "pt".into())]).unwrap()
    }

    fn header_len(f: &[u8]) -> u64 {
        8 + u64::from_le_bytes(f[..8].try_into().unwrap())
    }

    #[test]
    fn shards_open_lazily_and_count_only_headers_and_wanted_bytes() {
        let a = file(&[("x.a", vec![1.0, 2.0]), ("x.b", vec![3.0])]);
        let b = file(&[("y.c", vec![4.0, 5.0, 6.0])]);
        let index = br#"{"metadata":{"total_size":24},"weight_map":{"x.a":"s1.safetensors","x.b":"s1.safetensors","y.c":"s2.safetensors","z.d":"s3.safetensors"}}"#;
        let shards: Vec<(&str, &[u8])> = vec![("s1.safetensors", &a), ("s2.safetensors", &b)];
        let opened = std::rc::Rc::new(std::cell::RefCell::new(Vec::<String>::new()));
        let log = opened.clone();
        let opener: Opener = Box::new(move |name: &str| {
            log.borrow_mut().push(name.to_string());
            Ok(shards.iter().find(|(n, _)| *n == name).map(|(_, b)| Box::new(SliceSource::new(b)) as Box<dyn ByteSource + '_>))
        });
        let mut ck = Checkpoint::sharded(index, opener).unwrap();
        assert_eq!(ck.names().collect::<Vec<_>>(), ["x.a", "x.b", "y.c", "z.d"]);
        assert_eq!(ck.bytes_read(), 0);
        let got = ck.load(Some(&["y.c".to_string()])).unwrap();
        assert_eq!(got[0].1.shape(), &[3]);
        assert_eq!(*opened.borrow(), ["s2.safetensors"]);
        assert_eq!(ck.bytes_read(), header_len(&b) + 12);
        assert_eq!(ck.metadata(), vec![("format".to_string(), "pt".to_string()), ("total_size".to_string(), "24".to_string())]);
        // An absent shard names itself and the tensor that needs it.
        let err = ck.load(Some(&["z.d".to_string()])).unwrap_err();
        assert_eq!(err.to_string(), "s3.safetensors: this shard holds 'z.d', which this call needs, and is not among the given shards");
        // A name missing from the index lists the nearest.
        let err = ck.load(Some(&["x.e".to_string()])).unwrap_err();
        assert_eq!(err.to_string(), "x.e: no such tensor in the checkpoint (4 tensors; the nearest: 'x.a', 'x.b')");
        // info opens every shard: s3 is absent.
        assert!(ck.info().unwrap_err().to_string().starts_with("s3.safetensors:"));
    }

    #[test]
    fn index_entries_missing_from_their_shard_and_bad_indexes() {
        let a = file(&[("x.a", vec![1.0])]);
        let index = br#"{"weight_map":{"x.a":"s1.safetensors","x.b":"s1.safetensors"}}"#;
        let a = &a;
        let opener: Opener = Box::new(move |_: &str| Ok(Some(Box::new(SliceSource::new(a)) as Box<dyn ByteSource + '_>)));
        let mut ck = Checkpoint::sharded(index, opener).unwrap();
        let err = ck.load(Some(&["x.b".to_string()])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.b: the index puts it in 's1.safetensors', whose header does not have it (1 tensors; the nearest: 'x.a')"
        );
        assert!(ck.info().unwrap_err().to_string().starts_with("x.b: the index puts it in"));
        for (bad, msg) in [
            (&b"[1]"[..], "index: not a safetensors index: expected a JSON object"),
            (b"{\"metadata\":{}}", "index: not a safetensors index: no 'weight_map' (its keys: 'metadata')"),
            (b"{\"weight_map\":{\"a\":1}}", "index: weight_map['a']: expected a shard file name"),
            (b"{\"weight_map\":{\"a\":\"../x.safetensors\"}}", "index: weight_map['a'] = '../x.safetensors' is not a shard file name"),
            (b"{\"weight_map\":", "index: not a safetensors index (model.safetensors.index.json): "),
        ] {
            let err = Checkpoint::sharded(bad, Box::new(|_: &str| Ok(None))).err().unwrap();
            assert!(err.to_string().starts_with(msg), "{err}");
        }
    }

    #[test]
    fn paths_files_indexes_and_directories() {
        let dir = std::env::temp_dir().join(format!("moe-core-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sharded")).unwrap();
        let a = file(&[("x.a", vec![1.0, 2.0])]);
        let b = file(&[("x.b", vec![3.0])]);
        std::fs::write(dir.join("sharded/s1.safetensors"), &a).unwrap();
        std::fs::write(dir.join("sharded/s2.safetensors"), &b).unwrap();
        std::fs::write(dir.join("sharded").join(INDEX_FILE), br#"{"weight_map":{"x.a":"s1.safetensors","x.b":"s2.safetensors"}}"#).unwrap();
        std::fs::write(dir.join(SINGLE_FILE), &a).unwrap();
        for p in [dir.join("sharded"), dir.join("sharded").join(INDEX_FILE)] {
            let mut ck = Checkpoint::open_path(p.to_str().unwrap()).unwrap();
            assert!(ck.is_sharded());
            ck.load(Some(&["x.b".to_string()])).unwrap();
            assert_eq!(ck.bytes_read(), header_len(&b) + 4);
            let info = ck.info().unwrap();
            assert_eq!(
                info.iter().map(|t| (t.name.as_str(), t.file.as_str())).collect::<Vec<_>>(),
                [("x.a", "s1.safetensors"), ("x.b", "s2.safetensors")]
            );
        }
        for p in [dir.clone(), dir.join(SINGLE_FILE)] {
            let mut ck = Checkpoint::open_path(p.to_str().unwrap()).unwrap();
            assert!(!ck.is_sharded());
            assert_eq!(ck.info().unwrap()[0].file, SINGLE_FILE);
        }
        std::fs::remove_file(dir.join("sharded/s2.safetensors")).unwrap();
        let mut ck = Checkpoint::open_path(dir.join("sharded").to_str().unwrap()).unwrap();
        let err = ck.load(Some(&["x.b".to_string()])).unwrap_err();
        assert!(err.to_string().starts_with("s2.safetensors: the shard holding 'x.b': cannot open '"), "{err}");
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = Checkpoint::open_path(empty.to_str().unwrap()).err().unwrap();
        assert!(
            err.to_string().contains(
                "is a directory without model.safetensors.index.json or model.safetensors (its .safetensors and .json files: none)"
            ),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
