//! The macros the op table is written with (`ops.rs`).

/// Reads an argument object `o` (of the binding's [`Obj`] type `O`) field by field, as the op
/// table does: every field is read by its kind (`Kind::get`), then each is converted for the
/// core (`Kind::core`) in field order, bound to its name. A binding's own functions over the
/// same kinds (moe-node's CUDA functions) use it too, so they read and report their arguments
/// as the CPU ops do.
#[macro_export]
macro_rules! read_args {
    ($o:expr, $O:ty; $($arg:ident : $kind:ty),* $(,)?) => {
        $( let $arg = <$kind as $crate::Kind<$O>>::get($o, stringify!($arg))?; )*
        $( let $arg = <$kind as $crate::Kind<$O>>::core(&$arg, stringify!($arg))?; )*
    };
}

/// Expands the op table into one generic function per op (read the argument object, convert
/// each field for the core, run the body, convert the result) and `decls()`.
macro_rules! define {
    ($( $(#[doc = $doc:literal])* $name:ident ( $($arg:ident : $kind:ty),* $(,)? ) -> $ret:ty $body:block )*) => {
        $(
            $(#[doc = $doc])*
            #[allow(non_snake_case, unused_variables)]
            pub fn $name<O: Obj>(o: &O) -> Result<Value> {
                read_args!(o, O; $($arg: $kind),*);
                let out: <$ret as Ret>::Value = $body?;
                Ok(<$ret as Ret>::into_js(out))
            }
        )*
        /// Each op's name, doc, argument fields and result type, for `dts()`.
        pub fn decls() -> Vec<Decl> {
            vec![$( Decl {
                name: stringify!($name),
                doc: concat!($($doc, "\n",)* ""),
                fields: vec![$( (if <$kind as ArgTs>::FLAT { "" } else { stringify!($arg) }, <$kind as ArgTs>::OPTIONAL, <$kind as ArgTs>::ts()) ),*],
                ret: Some(<$ret as Ret>::ts()),
            } ),*]
        }
    };
}

/// Result objects: a Rust struct of result kinds, returned as a JS object of the same keys.
macro_rules! results {
    ($( $(#[doc = $doc:literal])* $name:ident { $($f:ident : $k:ty),* $(,)? } )*) => {
        $(
            $(#[doc = $doc])*
            #[allow(non_snake_case)]
            pub struct $name { $( pub $f: <$k as Ret>::Value ),* }
            impl Ret for $name {
                type Value = $name;
                fn ts() -> String {
                    stringify!($name).into()
                }
                fn into_js(v: $name) -> Value {
                    Value::Obj(vec![$( (Cow::Borrowed(stringify!($f)), <$k as Ret>::into_js(v.$f)) ),*])
                }
            }
        )*
        /// The result interfaces, for `dts()`.
        pub fn results() -> Vec<Decl> {
            vec![$( Decl {
                name: stringify!($name),
                doc: concat!($($doc, "\n",)* ""),
                fields: vec![$( (stringify!($f), <$k as Ret>::OPTIONAL, <$k as Ret>::ts()) ),*],
                ret: None,
            } ),*]
        }
    };
}

/// An argument group: fields of the argument object that become one core value (an options
/// struct), shared by the ops that take it. A group of tensors names the kind that holds a
/// tensor as a parameter with its default (`Name<'h, T = Tensor>`), so that another binding (the
/// CUDA functions, with device tensors) reads the same fields into the same core struct.
macro_rules! group {
    ($(#[doc = $doc:literal])* $name:ident<$lt:lifetime $(, $T:ident = $default:ty)?> -> $core:ty { $($f:ident : $k:ty),* $(,)? } => $conv:expr) => {
        $(#[doc = $doc])*
        pub struct $name$(<$T = $default>)?($(PhantomData<$T>)?);
        impl$(<$T: ArgTs>)? ArgTs for $name$(<$T>)? {
            const FLAT: bool = true;
            fn ts() -> String {
                field_list(&[$( (stringify!($f), <$k as ArgTs>::OPTIONAL, <$k as ArgTs>::ts()) ),*])
            }
        }
        impl<O: Obj $(, $T: Kind<O>)?> Kind<O> for $name$(<$T>)? {
            type Held = ($( <$k as Kind<O>>::Held, )*);
            type Core<$lt> = $core where O: $lt, Self: $lt;
            fn read(o: &O, _: &str) -> Result<Option<Self::Held>> {
                Ok(Some(($( <$k as Kind<O>>::get(o, stringify!($f))?, )*)))
            }
            #[allow(non_snake_case)]
            fn core<$lt>(held: &$lt Self::Held, _: &'static str) -> Result<$core> where O: $lt, Self: $lt {
                let ($($f,)*) = held;
                $( let $f = <$k as Kind<O>>::core($f, stringify!($f))?; )*
                $conv
            }
        }
    };
}
