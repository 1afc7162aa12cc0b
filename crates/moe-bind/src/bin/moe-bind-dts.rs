//! Writes (`--write FILE`) or checks (`--check FILE`) the TypeScript declarations of the op table.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(file)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: moe-bind-dts --write|--check ts/generated/binding.ts");
        std::process::exit(2);
    };
    let text = moe_bind::dts();
    if mode == "--write" {
        std::fs::write(file, text).expect("cannot write the declarations");
    } else if std::fs::read_to_string(file).ok().as_deref() != Some(text.as_str()) {
        eprintln!(
            "{file} is stale: the op table (crates/moe-bind/src/ops.rs) changed; run bash scripts/check-generated.sh --write and commit it"
        );
        std::process::exit(1);
    }
}
