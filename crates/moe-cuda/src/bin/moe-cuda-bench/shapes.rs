//! The benchmarks' shapes, from bench/shapes.json (compiled in): the one place every language's
//! benchmarks take them from (the PyTorch peers through bench/shapes.py, the JS benches through
//! bench/shapes.mjs).

use std::sync::OnceLock;

/// A MoE layer's experts: T tokens, each picking `topk` of `experts`, of `dim` -> `inter` -> `dim`.
pub struct ExpertShape {
    pub name: &'static str,
    pub tokens: usize,
    pub dim: usize,
    pub inter: usize,
    pub experts: usize,
    pub topk: usize,
    /// run when no `--shapes` is given
    pub by_default: bool,
}

/// permute / unpermute alone: T tokens of `hidden`, each picking `topk` of `experts`.
pub struct DispatchShape {
    pub name: &'static str,
    pub tokens: usize,
    pub hidden: usize,
    pub experts: usize,
    pub topk: usize,
}

const JSON: &str = include_str!("../../../../../bench/shapes.json");

fn parsed() -> &'static serde_json::Value {
    static V: OnceLock<serde_json::Value> = OnceLock::new();
    V.get_or_init(|| serde_json::from_str(JSON).expect("bench/shapes.json: not JSON"))
}

/// `entry[key]` as a usize, or a panic naming the shape and the key (the file is compiled in:
/// a bad entry is a build's mistake, caught by the first run and by test/shapes.test.ts).
fn field(entry: &serde_json::Value, key: &str) -> usize {
    entry[key].as_u64().unwrap_or_else(|| panic!("bench/shapes.json: {}: {key}: expected a whole number", entry["name"])) as usize
}

fn name(entry: &'static serde_json::Value) -> &'static str {
    entry["name"].as_str().expect("bench/shapes.json: a shape without a name")
}

fn list(key: &str) -> &'static [serde_json::Value] {
    parsed()[key].as_array().unwrap_or_else(|| panic!("bench/shapes.json: {key}: expected a list"))
}

/// The layer shapes, in the file's order.
pub fn layer() -> &'static [ExpertShape] {
    static S: OnceLock<Vec<ExpertShape>> = OnceLock::new();
    S.get_or_init(|| {
        list("layer")
            .iter()
            .map(|e| ExpertShape {
                name: name(e),
                tokens: field(e, "tokens"),
                dim: field(e, "dim"),
                inter: field(e, "inter"),
                experts: field(e, "experts"),
                topk: field(e, "topk"),
                by_default: e["byDefault"]
                    .as_bool()
                    .unwrap_or_else(|| panic!("bench/shapes.json: {}: byDefault: expected true or false", e["name"])),
            })
            .collect()
    })
}

/// The dispatch shapes, in the file's order.
pub fn dispatch() -> &'static [DispatchShape] {
    static S: OnceLock<Vec<DispatchShape>> = OnceLock::new();
    S.get_or_init(|| {
        list("dispatch")
            .iter()
            .map(|e| DispatchShape {
                name: name(e),
                tokens: field(e, "tokens"),
                hidden: field(e, "hidden"),
                experts: field(e, "experts"),
                topk: field(e, "topk"),
            })
            .collect()
    })
}

/// The shapes of `all` a `--shapes` list names, in its order (Err naming an unknown one); `none`
/// names no shape (a command's other parts alone: `run --shapes none` for a profiler), and no list
/// the `default` ones.
fn select<T>(
    all: &'static [T],
    name_of: fn(&T) -> &'static str,
    names: Option<&[String]>,
    default: fn(&T) -> bool,
) -> Result<Vec<&'static T>, String> {
    match names {
        None => Ok(all.iter().filter(|s| default(s)).collect()),
        Some([only]) if only == "none" => Ok(Vec::new()),
        Some(names) => names
            .iter()
            .map(|n| {
                all.iter().find(|s| name_of(s) == n).ok_or_else(|| {
                    format!(
                        "--shapes: unknown shape {n:?}; expected a comma list of {} (or none)",
                        all.iter().map(name_of).collect::<Vec<_>>().join(", ")
                    )
                })
            })
            .collect(),
    }
}

/// The layer shapes a `--shapes` list names, or the byDefault ones (see `select`).
pub fn select_layer(names: Option<&[String]>) -> Result<Vec<&'static ExpertShape>, String> {
    select(layer(), |s| s.name, names, |s| s.by_default)
}

/// The dispatch shapes a `--shapes` list names, or all of them (see `select`).
pub fn select_dispatch(names: Option<&[String]>) -> Result<Vec<&'static DispatchShape>, String> {
    select(dispatch(), |s| s.name, names, |_| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_parses_and_selects() {
        let names = |v: Vec<&ExpertShape>| v.iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(names(select_layer(None).unwrap()), ["fine-grained", "mixtral"]);
        let picked = select_layer(Some(&["deepseek-v3-ep8".to_string(), "mixtral".to_string()])).unwrap();
        assert_eq!(names(picked.clone()), ["deepseek-v3-ep8", "mixtral"]);
        let s = picked[0];
        assert_eq!((s.tokens, s.dim, s.inter, s.experts, s.topk, s.by_default), (8192, 7168, 2048, 32, 8, false));
        let err = select_layer(Some(&["mixtral".to_string(), "nope".to_string()])).map(|_| ()).unwrap_err();
        assert_eq!(err, "--shapes: unknown shape \"nope\"; expected a comma list of fine-grained, mixtral, deepseek-v3-ep8 (or none)");
        assert!(select_layer(Some(&["none".to_string()])).unwrap().is_empty());
        assert_eq!(select_dispatch(None).unwrap().len(), 2);
        assert!(select_dispatch(Some(&["none".to_string()])).unwrap().is_empty());
        let err = select_dispatch(Some(&["qwen".to_string()])).map(|_| ()).unwrap_err();
        assert_eq!(err, "--shapes: unknown shape \"qwen\"; expected a comma list of deepseek, mixtral (or none)");
        assert_eq!(
            dispatch().iter().map(|s| (s.name, s.tokens, s.hidden, s.experts, s.topk)).collect::<Vec<_>>(),
            [("deepseek", 16384, 7168, 256, 8), ("mixtral", 16384, 4096, 8, 2)]
        );
    }
}
