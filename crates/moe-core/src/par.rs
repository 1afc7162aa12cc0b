//! Row loops that run on all cores when the `parallel` feature is on and the work is large
//! enough to pay for it, and as a plain loop otherwise (always, in WebAssembly).

/// Below this many bytes touched, threads cost more than they save.
#[cfg(feature = "parallel")]
const PARALLEL_MIN_BYTES: usize = 1 << 20;

/// Calls `f(scratch, row_index, row)` for every `row_len`-long row of `out`.
/// `init` makes one scratch value per worker; `work_bytes` is the op's total traffic.
pub(crate) fn for_each_row<T, S, I, F>(out: &mut [T], row_len: usize, work_bytes: usize, init: I, f: F)
where
    T: Send,
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, usize, &mut [T]) + Sync + Send,
{
    if row_len == 0 || out.is_empty() {
        return;
    }
    #[cfg(feature = "parallel")]
    if work_bytes >= PARALLEL_MIN_BYTES && rayon::current_num_threads() > 1 {
        use rayon::prelude::*;
        let rows_per_task = (PARALLEL_MIN_BYTES / 8 / (work_bytes / (out.len() / row_len)).max(1)).max(1);
        out.par_chunks_mut(row_len).enumerate().with_min_len(rows_per_task).for_each_init(&init, |scratch, (i, row)| f(scratch, i, row));
        return;
    }
    let _ = work_bytes;
    let mut scratch = init();
    for (i, row) in out.chunks_mut(row_len).enumerate() {
        f(&mut scratch, i, row);
    }
}

/// Runs `f` on every task (each owns its outputs), on all cores when the `parallel` feature
/// is on and `work` (multiply-adds, roughly) is large enough, in order otherwise. The first
/// error wins; results never depend on which thread ran a task.
pub(crate) fn run_tasks<T, F>(tasks: Vec<T>, work: usize, f: F) -> crate::error::Result<()>
where
    T: Send,
    F: Fn(T) -> crate::error::Result<()> + Sync + Send,
{
    #[cfg(feature = "parallel")]
    if tasks.len() > 1 && work >= PARALLEL_MIN_BYTES && rayon::current_num_threads() > 1 {
        use rayon::prelude::*;
        return tasks.into_par_iter().with_max_len(1).map(f).collect();
    }
    let _ = work;
    tasks.into_iter().try_for_each(f)
}
