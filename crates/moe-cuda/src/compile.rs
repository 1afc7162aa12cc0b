//! Kernels: CUDA C from `kernels/*.cu`, embedded at build time, compiled by NVRTC at first use
//! for the device's own architecture, and cached twice: the loaded module per process (in the
//! [`Device`](crate::Device)), and the CUBIN on disk, keyed by the SHA-256 of source, options
//! and architecture, so that a second process loads it without compiling.
//!
//! Cache folder: `$MOE_DISPATCH_CACHE_DIR`, else `$XDG_CACHE_HOME/moe-dispatch`, else
//! `$HOME/.cache/moe-dispatch`; `MOE_DISPATCH_CACHE_DIR=off` turns the disk cache off. A cache
//! file that cannot be read or loaded is compiled again and replaced.

use std::ffi::{CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Instant;

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};

/// One `.cu` file of `kernels/`.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub file: &'static str,
    pub source: &'static str,
}

/// Prepended to every file before it is compiled (types, element conversions, detmath).
pub const COMMON: &str = include_str!("../kernels/common.cuh");

/// What NVRTC compiles for `src`: kernels/common.cuh, then the file (with `#line` so that
/// compile errors name the file's own lines).
pub fn full_source(src: &KernelSource) -> String {
    format!("{COMMON}\n#line 1 \"{}\"\n{}", src.file, src.source)
}

pub const PERMUTE: KernelSource = KernelSource { file: "permute.cu", source: include_str!("../kernels/permute.cu") };
/// The dispatch plan (routing map -> sortedIndices, token CSR) on the GPU.
pub const PLAN: KernelSource = KernelSource { file: "plan.cu", source: include_str!("../kernels/plan.cu") };
/// route and topk.
pub const ROUTING: KernelSource = KernelSource { file: "routing.cu", source: include_str!("../kernels/routing.cu") };
/// Expert activations forward and backward, and the aux losses.
pub const ACTIVATIONS: KernelSource = KernelSource { file: "activations.cu", source: include_str!("../kernels/activations.cu") };
/// Layout ops: indices <-> multihot, capacity (drop, pad, counts), chunk sort, grouped-mm sort,
/// and the probs gradients of permute/unpermute backward.
pub const LAYOUT: KernelSource = KernelSource { file: "layout.cu", source: include_str!("../kernels/layout.cu") };
/// The element kernels around the expert GEMMs (bias, epilogue, column sums, conversions).
pub const EXPERTS: KernelSource = KernelSource { file: "experts.cu", source: include_str!("../kernels/experts.cu") };
/// The optimizer (AdamW, the gradient norm) and the master weights' conversions.
pub const TRAIN: KernelSource = KernelSource { file: "train.cu", source: include_str!("../kernels/train.cu") };
/// Our own grouped GEMM for Hopper (wgmma + TMA): its launches use an sm_90a build
/// (crate::grouped_gemm); the device's own build holds stubs.
pub const GROUPED_GEMM: KernelSource = KernelSource { file: "grouped_gemm.cu", source: include_str!("../kernels/grouped_gemm.cu") };
/// Every kernel file, in load order.
pub const ALL: &[KernelSource] = &[PERMUTE, PLAN, ROUTING, ACTIVATIONS, LAYOUT, EXPERTS, TRAIN, GROUPED_GEMM];

/// NVRTC options for `arch` (e.g. "sm_90"). `--fmad=false`: no multiply-add contraction
/// anywhere, so f32 arithmetic rounds as the CPU core's does. `-lineinfo`: source lines for
/// profilers (Nsight Compute), no change to the code.
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--fmad=false".into(),
        "--ftz=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "-lineinfo".into(),
    ]
}

/// The disk cache key: SHA-256 of the source, the options and the architecture.
pub fn cache_key(src: &KernelSource, arch: &str) -> String {
    let mut text = String::with_capacity(src.source.len() + COMMON.len() + 256);
    text.push_str(src.file);
    text.push('\0');
    text.push_str(&full_source(src));
    text.push('\0');
    text.push_str(&options(arch).join(" "));
    text.push('\0');
    text.push_str(arch);
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("MOE_DISPATCH_CACHE_DIR") {
        Some(v) if v == "off" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(|v| PathBuf::from(v).join("moe-dispatch"))
            .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache").join("moe-dispatch"))),
    }
}

/// Where a module's CUBIN came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Origin {
    /// Read from the disk cache.
    Disk,
    /// Compiled by NVRTC now (and written to the disk cache where there is one).
    Compiled { seconds: f64 },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Disk => write!(f, "disk cache"),
            Origin::Compiled { seconds } => write!(f, "compiled by NVRTC in {seconds:.2} s"),
        }
    }
}

pub fn cache_path(src: &KernelSource, arch: &str) -> Option<PathBuf> {
    cache_dir().map(|d| d.join(format!("{}.{}.cubin", cache_key(src, arch), arch)))
}

/// The cached CUBIN of `src` for `arch`, if the disk cache has one.
pub fn cached_cubin(src: &KernelSource, arch: &str) -> Option<Vec<u8>> {
    let path = cache_path(src, arch)?;
    std::fs::read(path).ok().filter(|b| b.len() > 4 && &b[..4] == b"\x7fELF")
}

/// Writes a CUBIN to the disk cache (atomically: a temporary file, then a rename). Failing to
/// write is not an error: the next process compiles again.
pub fn store_cubin(src: &KernelSource, arch: &str, cubin: &[u8]) {
    let Some(path) = cache_path(src, arch) else { return };
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(".{}.{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("kernel"), std::process::id()));
    if std::fs::write(&tmp, cubin).is_ok() && std::fs::rename(&tmp, &path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Folders searched for libnvrtc when the dynamic loader's own search does not find it.
const NVRTC_DIRS: &[&str] =
    &["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/local/cuda-13.0/lib64", "/usr/lib/x86_64-linux-gnu"];

/// Makes sure libnvrtc can be opened: by the loader's search (LD_LIBRARY_PATH, ld.so.cache),
/// else from `$MOE_DISPATCH_NVRTC` (a file or a folder) or the usual CUDA folders, opened by
/// full path with RTLD_GLOBAL so that cudarc's later open by name finds the loaded library.
pub fn ensure_nvrtc() -> Result<()> {
    if unsafe { nvrtc_sys::is_culib_present() } {
        return Ok(());
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("MOE_DISPATCH_NVRTC").map(PathBuf::from) {
        if p.is_dir() {
            candidates.push(p.join("libnvrtc.so.13"));
        } else {
            candidates.push(p);
        }
    }
    candidates.extend(NVRTC_DIRS.iter().map(|d| PathBuf::from(d).join("libnvrtc.so.13")));
    for path in candidates.iter().filter(|p| p.exists()) {
        #[cfg(unix)]
        {
            use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
            if let Ok(lib) = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) } {
                // Stays loaded for the life of the process, like cudarc's own handle.
                std::mem::forget(lib);
                if unsafe { nvrtc_sys::is_culib_present() } {
                    return Ok(());
                }
            }
        }
    }
    Err(Error::Unavailable(
        "libnvrtc.so.13 not found (NVRTC compiles the kernels at first use: put CUDA 13's lib folder on LD_LIBRARY_PATH or set MOE_DISPATCH_NVRTC to the library)".into(),
    ))
}

/// Compiles `src` to a CUBIN for `arch` with NVRTC.
pub fn compile_cubin(src: &KernelSource, arch: &str) -> Result<Vec<u8>> {
    ensure_nvrtc()?;
    let what = format!("compiling kernels/{} for {arch}", src.file);
    let result = catch_unwind(AssertUnwindSafe(|| compile_inner(src, arch, &what)));
    match result {
        Ok(r) => r,
        Err(panic) => Err(Error::Cuda(format!("{what}: NVRTC failed: {}", panic_message(&panic)))),
    }
}

fn compile_inner(src: &KernelSource, arch: &str, what: &str) -> Result<Vec<u8>> {
    let source = CString::new(full_source(src)).map_err(|_| Error::Cuda(format!("{what}: the source holds a NUL byte")))?;
    let name = CString::new(src.file).map_err(|_| Error::Cuda(format!("{what}: bad file name")))?;
    let prog = nvrtc::create_program(&source, Some(&name)).map_err(|e| Error::nvrtc(what, e))?;
    let mut opts = options(arch);
    // MOE_DISPATCH_NVRTC_VERBOSE: ptxas's report (registers, spills, wgmma serialisation) on
    // stderr for each file compiled (the CUBIN is the same; the disk cache key does not change)
    let verbose = std::env::var_os("MOE_DISPATCH_NVRTC_VERBOSE").is_some();
    if verbose {
        opts.push("--ptxas-options=-v".into());
    }
    let compiled = unsafe { nvrtc::compile_program(prog, &opts) };
    let log = || {
        unsafe { nvrtc::get_program_log(prog) }
            .map(|raw| unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    if verbose && compiled.is_ok() {
        eprintln!("{what}: {}", log().trim_end());
    }
    let out = match compiled {
        Err(e) => Err(Error::Cuda(format!("{what}: NVRTC error {:?} with options {}:\n{}", e.0, opts.join(" "), log().trim_end()))),
        Ok(()) => unsafe {
            let mut size = 0usize;
            nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| Error::nvrtc(what, e))?;
            let mut cubin = vec![0u8; size];
            nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _).result().map_err(|e| Error::nvrtc(what, e))?;
            if size == 0 {
                Err(Error::Cuda(format!("{what}: NVRTC produced no CUBIN (is {arch} a real architecture?)")))
            } else {
                Ok(cubin)
            }
        },
    };
    let _ = unsafe { nvrtc::destroy_program(prog) };
    out
}

/// The CUBIN of `src` for `arch`: from the disk cache, else compiled now (and stored).
pub fn cubin(src: &KernelSource, arch: &str) -> Result<(Vec<u8>, Origin)> {
    if let Some(bytes) = cached_cubin(src, arch) {
        return Ok((bytes, Origin::Disk));
    }
    fresh_cubin(src, arch)
}

/// Compiles now, ignoring the disk cache, and stores the result.
pub fn fresh_cubin(src: &KernelSource, arch: &str) -> Result<(Vec<u8>, Origin)> {
    let t0 = Instant::now();
    let bytes = compile_cubin(src, arch)?;
    let seconds = t0.elapsed().as_secs_f64();
    store_cubin(src, arch, &bytes);
    Ok((bytes, Origin::Compiled { seconds }))
}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_arch_and_source() {
        let a = cache_key(&PERMUTE, "sm_90");
        assert_eq!(a.len(), 64);
        assert_ne!(a, cache_key(&PERMUTE, "sm_80"));
        let other = KernelSource { file: "permute.cu", source: "// other" };
        assert_ne!(a, cache_key(&other, "sm_90"));
        assert_eq!(a, cache_key(&PERMUTE, "sm_90"));
    }

    /// Every kernel definition of every file: the text after its declaration's opening brace
    /// (comments skipped) and the declaration's first line.
    fn kernel_bodies(source: &str) -> Vec<(String, &str)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(i) = source[at..].find("extern \"C\" __global__") {
            let start = at + i;
            let line_start = source[..start].rfind('\n').map_or(0, |n| n + 1);
            at = start + 1;
            if source[line_start..start].trim_start().starts_with("//") {
                continue;
            }
            let open = start + source[start..].find('{').expect("a kernel without a body");
            let head = source[start..].lines().next().unwrap_or("").to_string();
            out.push((head, &source[open + 1..]));
        }
        out
    }

    /// The programmatic dependent launches' rule (kernels/common.cuh, MOE_PDL_ENTRY): a kernel
    /// so launched may start before the one before it has finished, so each one's first
    /// statement waits for it; a kernel that did anything before (or never waited, in any block)
    /// could read what is not yet written, or let the next kernel run ahead of the one before.
    #[test]
    fn every_kernel_enters_through_pdl() {
        let mut kernels = 0;
        for src in ALL {
            for (head, body) in kernel_bodies(src.source) {
                assert!(
                    body.trim_start().starts_with("MOE_PDL_ENTRY();"),
                    "kernels/{}: `{head}` does not start with MOE_PDL_ENTRY();",
                    src.file
                );
                kernels += 1;
            }
        }
        // as many as the files declare (kernel_names expands the macros' instantiations)
        assert!(kernels >= 150, "found {kernels} kernel definitions");
        let bad = "extern \"C\" __global__ void k(int* x) { x[0] = 1; MOE_PDL_ENTRY(); }";
        assert!(!kernel_bodies(bad)[0].1.trim_start().starts_with("MOE_PDL_ENTRY();"));
        assert!(COMMON.contains("#define MOE_PDL_ENTRY() asm volatile(\"griddepcontrol.wait;"));
    }
}
