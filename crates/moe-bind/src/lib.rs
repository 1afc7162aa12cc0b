//! The JavaScript boundary of moe-core's CPU ops, written once. `ops.rs` is the op table: each
//! op takes one argument object (a field per tensor and option), makes one core call and returns
//! one result. `moe-node` (N-API) and `moe-wasm` (wasm-bindgen) expand the table into their
//! exported functions (`op_table!`) and implement [`Obj`] (reading a field of a JS object) and
//! the conversion of a [`Value`] into a JS value; that is all they hold. [`dts`] writes the
//! TypeScript declarations of the same table (`ts/generated/binding.ts`, checked for staleness).

use std::borrow::Cow;
use std::cell::RefCell;
use std::marker::PhantomData;

use moe_core::checkpoint::{for_key, ByteSource, Checkpoint, Loaded, Opener};
use moe_core::error::size_arg;
use moe_core::{Error, Result, TensorMut, TensorRef};

#[macro_use]
mod table;
pub mod ops;

/// An op's argument object as a binding reads it: a getter gives `None` for an absent
/// (undefined or null) field and a TypeError naming the field for a value of another kind.
pub trait Obj: Sized {
    /// A tensor's bytes (N-API: the caller's buffer; wasm: a copy in the module's memory).
    type Bytes: AsRef<[u8]>;
    /// A checkpoint file's bytes, read range by range (wasm: they stay in JavaScript memory).
    type Blob;
    /// A caller-owned output's bytes (N-API: the caller's buffer, written in place; wasm: a
    /// buffer in the module's memory, copied into the caller's once the op succeeded).
    type Out: OutBuf;
    fn keys(&self) -> Result<Vec<String>>;
    fn object(&self, key: &str) -> Result<Option<Self>>;
    fn number(&self, key: &str) -> Result<Option<f64>>;
    fn boolean(&self, key: &str) -> Result<Option<bool>>;
    fn string(&self, key: &str) -> Result<Option<String>>;
    fn numbers(&self, key: &str) -> Result<Option<Vec<f64>>>;
    fn strings(&self, key: &str) -> Result<Option<Vec<String>>>;
    fn bytes(&self, key: &str) -> Result<Option<Self::Bytes>>;
    fn blob(&self, key: &str) -> Result<Option<Self::Blob>>;
    /// A Uint8Array to write an output into.
    fn out(&self, key: &str) -> Result<Option<Self::Out>>;
    fn source(blob: &Self::Blob) -> Result<Box<dyn ByteSource + '_>>;
    /// A checkpoint at a path (the wasm binding has no files and says so).
    fn open_path<'a>(path: &str) -> Result<Checkpoint<'a>>;
}

/// An output buffer as a binding holds it.
pub trait OutBuf {
    /// The bytes the op overwrites.
    fn bytes_mut(&mut self) -> &mut [u8];
    /// Called once the op has written every byte (wasm: the copy into JavaScript memory).
    fn commit(&mut self) {}
}

/// A result on its way out; each binding turns it into the JS value (`Undefined` fields are left out).
pub enum Value {
    Undefined,
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    /// `{ dtype, shape, data }` with the dtype's TypedArray (bfloat16/float16 as Uint16Array bits, bool as Uint8Array).
    Tensor(moe_core::Tensor),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Obj(Vec<(Cow<'static, str>, Value)>),
}

/// The TypeScript side of an argument kind.
pub trait ArgTs {
    /// `key?:` in the declaration.
    const OPTIONAL: bool = false;
    /// A group of fields read from the argument object itself (its `ts()` is their list).
    const FLAT: bool = false;
    fn ts() -> String;
}

/// An argument kind: what a field holds in JavaScript (`Held`, read once) and what the core
/// takes (`Core`, borrowing it). Required unless the kind says otherwise.
pub trait Kind<O: Obj>: ArgTs {
    type Held;
    type Core<'h>
    where
        Self: 'h,
        O: 'h;
    fn read(o: &O, key: &str) -> Result<Option<Self::Held>>;
    fn get(o: &O, key: &str) -> Result<Self::Held> {
        Self::read(o, key)?.ok_or_else(|| Error::type_error(key, format!("{} (required)", Self::ts()), "undefined"))
    }
    fn core<'h>(held: &'h Self::Held, key: &'static str) -> Result<Self::Core<'h>>
    where
        Self: 'h,
        O: 'h;
}

/// A result kind: the Rust value an op returns for it and its TypeScript type.
pub trait Ret {
    type Value;
    const OPTIONAL: bool = false;
    fn ts() -> String;
    fn into_js(v: Self::Value) -> Value;
}

/// A wire tensor `{ dtype, shape, data: Uint8Array }` in; a `Tensor` out.
pub struct Tensor;
/// A size: a number that must be a non-negative integer (`size_arg`: 2.5 is reported, not truncated).
pub struct Size;
/// A boolean that is false when absent.
pub struct Flag;
pub struct Num;
pub struct Bool;
pub struct Str;
pub struct Nums;
pub struct Strs;
/// An object of named values, in the object's key order.
pub struct Record<K>(PhantomData<K>);
/// A checkpoint: exactly one of a path, one file's bytes, or an index's json bytes with its shards.
pub struct Source;
/// Out: a Uint8Array.
pub struct Bytes;
/// Out: an array.
pub struct List<K>(PhantomData<K>);
/// Out: a value or null.
pub struct Nullable<K>(PhantomData<K>);
/// Out: a loaded checkpoint tensor (int64 as `{ dtype: 'int64', shape, data: Uint8Array }` of its bytes).
pub struct LoadedTensor;

/// A tensor's dtype and shape `{ dtype, shape, data?: Uint8Array }`, its bytes when they are on
/// the host: what a check function of the core takes ([`moe_core::tensor::Meta`]; the webgpu
/// backend checks its GPU tensors with the core's checks through it, no data copied).
pub struct TensorMeta;

/// A caller-owned output `{ dtype, shape, data: Uint8Array }` in (written by the op, see
/// [`with_outs`]); `Option<Out>` in the table, absent when the op allocates its result.
pub struct Out;

/// An output as read (its bytes borrowed mutably by [`with_outs`]).
pub struct OutHeld<B> {
    dtype: String,
    shape: Vec<f64>,
    data: RefCell<B>,
}

/// An output as the op body gets it.
pub struct OutArg<'h, B>(&'h OutHeld<B>);

impl ArgTs for Out {
    fn ts() -> String {
        "WireTensor".into()
    }
}

impl<O: Obj> Kind<O> for Out {
    type Held = OutHeld<O::Out>;
    type Core<'h>
        = OutArg<'h, O::Out>
    where
        O: 'h;
    fn read(o: &O, key: &str) -> Result<Option<Self::Held>> {
        let Some(w) = o.object(key)? else { return Ok(None) };
        let bad = |what: &str| Error::type_error(key, "a wire tensor { dtype, shape, data: Uint8Array }", what);
        let dtype = w.string("dtype")?.ok_or_else(|| bad("no dtype"))?;
        let shape = w.numbers("shape")?.ok_or_else(|| bad("no shape"))?;
        Ok(Some(OutHeld { dtype, shape, data: RefCell::new(w.out("data")?.ok_or_else(|| bad("no data"))?) }))
    }
    fn core<'h>(held: &'h Self::Held, _: &'static str) -> Result<Self::Core<'h>>
    where
        O: 'h,
    {
        Ok(OutArg(held))
    }
}

/// Runs an op body on caller-owned outputs, each named as errors should name it
/// (`out.permutedTokens`): views them as [`TensorMut`]s (absent ones as None) for `f`, which
/// checks them before writing, and commits each (wasm: copies it out) only when `f` succeeded.
pub fn with_outs<B: OutBuf, R>(
    outs: &[(Option<&OutArg<'_, B>>, &'static str)],
    f: impl FnOnce(&mut [Option<TensorMut<'_>>]) -> Result<R>,
) -> Result<R> {
    let mut guards: Vec<Option<std::cell::RefMut<'_, B>>> = outs.iter().map(|(o, _)| o.map(|o| o.0.data.borrow_mut())).collect();
    let r = {
        let mut views = Vec::with_capacity(outs.len());
        for ((o, name), g) in outs.iter().zip(guards.iter_mut()) {
            views.push(match (o, g) {
                (Some(o), Some(g)) => Some(TensorMut::from_parts(name, &o.0.dtype, &o.0.shape, g.bytes_mut())?),
                _ => None,
            });
        }
        f(&mut views)?
    };
    guards.iter_mut().flatten().for_each(|g| g.commit());
    Ok(r)
}

/// An op whose one result may go into a caller-owned output `out`: `alloc` when it is absent
/// (the result), else `into` on it under [`with_outs`] (the result is then null).
pub fn alloc_or_into<B: OutBuf>(
    out: Option<&OutArg<'_, B>>,
    alloc: impl FnOnce() -> Result<moe_core::Tensor>,
    into: impl FnOnce(&mut TensorMut<'_>) -> Result<()>,
) -> Result<Option<moe_core::Tensor>> {
    match out {
        None => alloc().map(Some),
        Some(out) => with_outs(&[(Some(out), "out")], |o| into(o[0].as_mut().expect("given"))).map(|()| None),
    }
}

/// A wire tensor as read.
pub struct Wire<B> {
    dtype: String,
    shape: Vec<f64>,
    data: B,
}

/// A [`TensorMeta`] as read.
pub struct MetaHeld<B> {
    dtype: String,
    shape: Vec<f64>,
    data: Option<B>,
}

/// A [`TensorMeta`] as an op body gets it: a host tensor (its bytes checked against its shape) or
/// a dtype and a shape.
pub enum MetaArg<'h> {
    Host(TensorRef<'h>),
    Shape { name: &'static str, dtype: moe_core::DType, shape: Vec<usize> },
}

impl MetaArg<'_> {
    pub fn meta(&self) -> moe_core::tensor::Meta<'_> {
        match self {
            MetaArg::Host(t) => t.meta(),
            MetaArg::Shape { name, dtype, shape } => moe_core::tensor::Meta::shape_only(name, *dtype, shape),
        }
    }
}

/// A checkpoint source as read.
pub enum SourceHeld<O: Obj> {
    Path(String),
    Bytes(O::Blob),
    Sharded(O::Bytes, Vec<(String, O::Blob)>),
}

macro_rules! simple_kinds {
    ($lt:lifetime, $key:ident; $($kind:ty => $ts:literal, $held:ty, $read:ident, |$h:ident| $core:ty = $conv:expr;)*) => {$(
        impl ArgTs for $kind {
            fn ts() -> String {
                $ts.into()
            }
        }
        impl<O: Obj> Kind<O> for $kind {
            type Held = $held;
            type Core<$lt> = $core where O: $lt;
            fn read(o: &O, key: &str) -> Result<Option<$held>> {
                o.$read(key)
            }
            #[allow(unused_variables)]
            fn core<$lt>($h: &$lt $held, $key: &'static str) -> Result<$core> where O: $lt {
                $conv
            }
        }
    )*};
}

simple_kinds! { 'h, key;
    Size => "number", f64, number, |h| usize = size_arg(key, *h);
    Num => "number", f64, number, |h| f64 = Ok(*h);
    Bool => "boolean", bool, boolean, |h| bool = Ok(*h);
    Str => "string", String, string, |h| &'h str = Ok(h.as_str());
    Nums => "number[]", Vec<f64>, numbers, |h| &'h [f64] = Ok(&h[..]);
    Strs => "string[]", Vec<String>, strings, |h| &'h [String] = Ok(&h[..]);
}

impl ArgTs for Flag {
    const OPTIONAL: bool = true;
    fn ts() -> String {
        "boolean".into()
    }
}

impl<O: Obj> Kind<O> for Flag {
    type Held = bool;
    type Core<'h>
        = bool
    where
        O: 'h;
    fn read(o: &O, key: &str) -> Result<Option<bool>> {
        Ok(Some(o.boolean(key)?.unwrap_or(false)))
    }
    fn core<'h>(held: &'h bool, _: &'static str) -> Result<bool>
    where
        O: 'h,
    {
        Ok(*held)
    }
}

impl<K: ArgTs> ArgTs for Option<K> {
    const OPTIONAL: bool = true;
    fn ts() -> String {
        K::ts()
    }
}

impl<O: Obj, K: Kind<O>> Kind<O> for Option<K> {
    type Held = Option<K::Held>;
    type Core<'h>
        = Option<K::Core<'h>>
    where
        Self: 'h,
        O: 'h;
    fn read(o: &O, key: &str) -> Result<Option<Self::Held>> {
        Ok(Some(K::read(o, key)?))
    }
    fn core<'h>(held: &'h Self::Held, key: &'static str) -> Result<Self::Core<'h>>
    where
        Self: 'h,
        O: 'h,
    {
        held.as_ref().map(|h| K::core(h, key)).transpose()
    }
}

impl ArgTs for Tensor {
    fn ts() -> String {
        "WireTensor".into()
    }
}

/// A tensor argument's `{ dtype, shape, data? }` (absent: None; `what` names the expected value in errors).
fn read_parts<O: Obj>(o: &O, key: &str, what: &str) -> Result<Option<MetaHeld<O::Bytes>>> {
    let Some(w) = o.object(key)? else { return Ok(None) };
    let bad = |m: &str| Error::type_error(key, what, m);
    let dtype = w.string("dtype")?.ok_or_else(|| bad("no dtype"))?;
    let shape = w.numbers("shape")?.ok_or_else(|| bad("no shape"))?;
    Ok(Some(MetaHeld { dtype, shape, data: w.bytes("data")? }))
}

impl<O: Obj> Kind<O> for Tensor {
    type Held = Wire<O::Bytes>;
    type Core<'h>
        = TensorRef<'h>
    where
        O: 'h;
    fn read(o: &O, key: &str) -> Result<Option<Self::Held>> {
        const WHAT: &str = "a wire tensor { dtype, shape, data: Uint8Array }";
        let Some(MetaHeld { dtype, shape, data }) = read_parts(o, key, WHAT)? else { return Ok(None) };
        Ok(Some(Wire { dtype, shape, data: data.ok_or_else(|| Error::type_error(key, WHAT, "no data"))? }))
    }
    fn core<'h>(w: &'h Self::Held, key: &'static str) -> Result<TensorRef<'h>>
    where
        O: 'h,
    {
        TensorRef::from_parts(key, &w.dtype, &w.shape, w.data.as_ref())
    }
}

impl ArgTs for TensorMeta {
    fn ts() -> String {
        "WireMeta".into()
    }
}

impl<O: Obj> Kind<O> for TensorMeta {
    type Held = MetaHeld<O::Bytes>;
    type Core<'h>
        = MetaArg<'h>
    where
        O: 'h;
    fn read(o: &O, key: &str) -> Result<Option<Self::Held>> {
        read_parts(o, key, "a tensor's { dtype, shape, data?: Uint8Array }")
    }
    fn core<'h>(w: &'h Self::Held, key: &'static str) -> Result<MetaArg<'h>>
    where
        O: 'h,
    {
        if let Some(data) = &w.data {
            return TensorRef::from_parts(key, &w.dtype, &w.shape, data.as_ref()).map(MetaArg::Host);
        }
        let dtype = moe_core::DType::parse(key, &w.dtype)?;
        let shape = w.shape.iter().enumerate().map(|(i, &d)| size_arg(&format!("{key}.shape[{i}]"), d)).collect::<Result<Vec<_>>>()?;
        Ok(MetaArg::Shape { name: key, dtype, shape })
    }
}

impl<K: ArgTs> ArgTs for Record<K> {
    fn ts() -> String {
        format!("Record<string, {}>", K::ts())
    }
}

impl<O: Obj, K: Kind<O>> Kind<O> for Record<K> {
    type Held = Vec<(String, K::Held)>;
    type Core<'h>
        = Vec<(String, K::Core<'h>)>
    where
        Self: 'h,
        O: 'h;
    fn read(o: &O, key: &str) -> Result<Option<Self::Held>> {
        let Some(r) = o.object(key)? else { return Ok(None) };
        r.keys()?.into_iter().map(|k| K::get(&r, &k).map(|h| (k, h))).collect::<Result<_>>().map(Some)
    }
    fn core<'h>(held: &'h Self::Held, key: &'static str) -> Result<Self::Core<'h>>
    where
        Self: 'h,
        O: 'h,
    {
        held.iter().map(|(n, h)| Ok((n.clone(), K::core(h, key).map_err(|e| for_key(e, key, n))?))).collect()
    }
}

impl ArgTs for Source {
    fn ts() -> String {
        "CheckpointSource".into()
    }
}

impl<O: Obj> Kind<O> for Source {
    type Held = SourceHeld<O>;
    type Core<'h>
        = Checkpoint<'h>
    where
        O: 'h;
    fn read(o: &O, key: &str) -> Result<Option<SourceHeld<O>>> {
        let Some(s) = o.object(key)? else { return Ok(None) };
        let shards = match s.object("shards")? {
            Some(sh) => Some(
                sh.keys()?
                    .into_iter()
                    .map(|k| {
                        Ok((
                            sh.blob(&k)?.ok_or_else(|| Error::type_error(format!("source.shards['{k}']"), "a Uint8Array", "undefined"))?,
                            k,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            None => None,
        };
        Ok(Some(match (s.string("path")?, s.blob("bytes")?, s.bytes("index")?) {
            (Some(p), None, None) => SourceHeld::Path(p),
            (None, Some(b), None) => SourceHeld::Bytes(b),
            (None, None, Some(i)) => SourceHeld::Sharded(i, shards.unwrap_or_default().into_iter().map(|(b, k)| (k, b)).collect()),
            _ => {
                return Err(Error::type_error("source", "a path, one file's bytes, or { index, shards } (exactly one)", "several or none"))
            }
        }))
    }
    fn core<'h>(held: &'h SourceHeld<O>, _: &'static str) -> Result<Checkpoint<'h>>
    where
        O: 'h,
    {
        match held {
            SourceHeld::Path(p) => O::open_path(p),
            SourceHeld::Bytes(b) => Checkpoint::single("", O::source(b)?),
            SourceHeld::Sharded(index, shards) => {
                let opener: Opener =
                    Box::new(move |file: &str| shards.iter().find(|(n, _)| n == file).map(|(_, b)| O::source(b)).transpose());
                Checkpoint::sharded(index.as_ref(), opener)
            }
        }
    }
}

macro_rules! simple_rets {
    ($($kind:ty => $ts:literal, $value:ty, |$v:ident| $conv:expr;)*) => {$(
        impl Ret for $kind {
            type Value = $value;
            fn ts() -> String {
                $ts.into()
            }
            fn into_js($v: $value) -> Value {
                $conv
            }
        }
    )*};
}

simple_rets! {
    Tensor => "Tensor", moe_core::Tensor, |v| Value::Tensor(v);
    Size => "number", usize, |v| Value::Num(v as f64);
    Num => "number", f64, |v| Value::Num(v);
    Bool => "boolean", bool, |v| Value::Bool(v);
    Str => "string", String, |v| Value::Str(v);
    Bytes => "Uint8Array", Vec<u8>, |v| Value::Bytes(v);
    LoadedTensor => "Tensor", Loaded, |v| match v {
        Loaded::Tensor(t) => Value::Tensor(t),
        Loaded::Int64 { shape, bytes } => Value::Obj(vec![
            ("dtype".into(), Value::Str("int64".into())),
            ("shape".into(), Value::List(shape.into_iter().map(|d| Value::Num(d as f64)).collect())),
            ("data".into(), Value::Bytes(bytes)),
        ]),
    };
}

impl<K: Ret> Ret for Option<K> {
    type Value = Option<K::Value>;
    const OPTIONAL: bool = true;
    fn ts() -> String {
        K::ts()
    }
    fn into_js(v: Self::Value) -> Value {
        v.map_or(Value::Undefined, K::into_js)
    }
}

impl<K: Ret> Ret for Nullable<K> {
    type Value = Option<K::Value>;
    fn ts() -> String {
        format!("{} | null", K::ts())
    }
    fn into_js(v: Self::Value) -> Value {
        v.map_or(Value::Null, K::into_js)
    }
}

impl<K: Ret> Ret for List<K> {
    type Value = Vec<K::Value>;
    fn ts() -> String {
        format!("{}[]", K::ts())
    }
    fn into_js(v: Self::Value) -> Value {
        Value::List(v.into_iter().map(K::into_js).collect())
    }
}

impl<K: Ret> Ret for Record<K> {
    type Value = Vec<(String, K::Value)>;
    fn ts() -> String {
        format!("Record<string, {}>", K::ts())
    }
    fn into_js(v: Self::Value) -> Value {
        Value::Obj(v.into_iter().map(|(k, v)| (Cow::Owned(k), K::into_js(v))).collect())
    }
}

/// One declaration of the TypeScript output: an interface (`ops: false`) or an op of `Binding`.
pub struct Decl {
    pub name: &'static str,
    pub doc: &'static str,
    /// `(key, optional, type)`; a group's fields are spliced in (key `""`, type its field list).
    pub fields: Vec<(&'static str, bool, String)>,
    pub ret: Option<String>,
}

fn field_list(fields: &[(&str, bool, String)]) -> String {
    let parts: Vec<String> = fields
        .iter()
        .map(|(k, opt, ts)| if k.is_empty() { ts.clone() } else { format!("{k}{}: {ts}", if *opt { "?" } else { "" }) })
        .collect();
    parts.join("; ")
}

fn doc_comment(doc: &str, indent: &str) -> String {
    let lines: Vec<&str> = doc.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    match lines.len() {
        0 => String::new(),
        1 => format!("{indent}/** {} */\n", lines[0]),
        _ => format!("{indent}/**\n{}{indent} */\n", lines.iter().map(|l| format!("{indent} * {l}\n")).collect::<String>()),
    }
}

/// The TypeScript declarations of the op table: each op's argument and result interfaces and
/// `Binding`, what both bindings export (`ts/generated/binding.ts`).
pub fn dts() -> String {
    let mut out = String::from(
        "// Generated from crates/moe-bind/src/ops.rs by `bash scripts/check-generated.sh --write`; do not edit.\n\
         // scripts/check-generated.sh (run by npm test) fails when this file is stale.\n\
         import type { Tensor } from '../tensor.js';\nimport type { WireMeta, WireTensor } from '../wire.js';\n\n\
         /** A checkpoint: exactly one of a path (native binding only), one file's bytes, or an index's json bytes with its shard files' bytes. */\n\
         export interface CheckpointSource { path?: string; bytes?: Uint8Array; index?: Uint8Array; shards?: Record<string, Uint8Array> }\n",
    );
    let pascal = |n: &str| n[..1].to_uppercase() + &n[1..];
    for d in ops::results() {
        out += &format!("\n{}export interface {} {{ {} }}\n", doc_comment(d.doc, ""), d.name, field_list(&d.fields));
    }
    let ops = ops::decls();
    for d in ops.iter().filter(|d| !d.fields.is_empty()) {
        out += &format!("\nexport interface {}Args {{ {} }}\n", pascal(d.name), field_list(&d.fields));
    }
    out += "\n/** The functions both CPU bindings (moe-node, moe-wasm) export. */\nexport interface Binding {\n";
    for d in &ops {
        let args = if d.fields.is_empty() { String::new() } else { format!("args: {}Args", pascal(d.name)) };
        out += &format!("{}  {}({args}): {};\n", doc_comment(d.doc, "  "), d.name, d.ret.as_deref().unwrap_or("void"));
    }
    out + "}\n"
}
