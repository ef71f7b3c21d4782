//! The daemon's memory budget: its default size (`max_memory`), the smallest size that still
//! moves every frame, and giving freed memory back to the system once a burst is over.
//!
//! The budget itself ([`xfer_core::MemoryBudget`]) is shared by every connection: a large
//! frame is read, and a chunk for a download is read from disk, only into bytes reserved from
//! it. Small frames (64 KiB and under) are cut from each connection's own read buffer, a
//! fixed cost per connection bounded by `max_connections`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use xfer_core::MemoryBudget;

use crate::metrics::Metrics;

const MIB: u64 = 1 << 20;

/// The budget the daemon's connections share: made once per `metrics`, which reports it, and
/// the same one for every later call (a reload does not resize it).
pub fn shared_budget(metrics: &Metrics, max_memory: u64) -> MemoryBudget {
    metrics
        .buffers
        .get_or_init(|| MemoryBudget::new(usize::try_from(max_memory).unwrap_or(usize::MAX)))
        .clone()
}

/// The default budget: a quarter of the memory this process may use (the machine's, or its
/// cgroup's if smaller), at least [`DEFAULT_FLOOR`], at most [`DEFAULT_CAP`]. A quarter leaves
/// the page cache (every write goes through it) and the rest of the host their share; the cap
/// because more buffer does not move bytes faster: 1 GiB holds two 4 MiB chunks for each of
/// 128 connections, twice the default `max_streams`.
pub fn default_max_memory() -> u64 {
    default_for(usable_memory())
}

/// The default floor: two of the largest frames in flight, with room to spare.
pub const DEFAULT_FLOOR: u64 = 64 * MIB;
/// The default cap.
pub const DEFAULT_CAP: u64 = 1024 * MIB;

/// The smallest budget accepted: two of the largest frames a peer may send (a 16 MiB chunk and
/// its header), so one connection can read a chunk while the one before it is written, and no
/// frame is ever larger than the budget.
pub const MIN_MAX_MEMORY: u64 = 2 * (xfer_proto::MAX_FRAME_LEN as u64).div_ceil(MIB) * MIB;
const _: () = assert!(DEFAULT_FLOOR >= MIN_MAX_MEMORY);

fn default_for(usable: Option<u64>) -> u64 {
    usable.map_or(DEFAULT_FLOOR, |bytes| {
        (bytes / 4).clamp(DEFAULT_FLOOR, DEFAULT_CAP)
    })
}

/// The memory this process may use: `MemTotal`, or its cgroup's `memory.max` when lower.
fn usable_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total = meminfo.lines().find_map(|line| {
        let kib = line.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?;
        kib.trim().parse::<u64>().ok().map(|k| k * 1024)
    })?;
    Some(cgroup_limit().map_or(total, |limit| limit.min(total)))
}

/// The cgroup v2 memory limit of this process, if it has one.
fn cgroup_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.max")).ok()?;
    max.trim().parse().ok()
}

/// How often the allocator is asked to give freed memory back, once the buffers went quiet.
const TRIM_EVERY: Duration = Duration::from_secs(2);

/// Asks the allocator to return freed pages to the system once the daemon goes quiet (no buffer
/// freed, no connection opened or closed for [`TRIM_EVERY`]): after a burst, glibc keeps what
/// was freed in its arenas for reuse, and the daemon's RSS would stay near its peak. Runs until
/// `shutdown`.
pub async fn trim_when_idle(
    budget: MemoryBudget,
    metrics: std::sync::Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let activity = || {
        (
            budget.released(),
            metrics.connections_accepted.get(),
            metrics.connections_open.get(),
        )
    };
    let mut tick = tokio::time::interval(TRIM_EVERY);
    let mut last = activity();
    let mut dirty = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = activity();
        if now != last {
            // Still busy: trimming now would only be undone by the next allocation.
            (last, dirty) = (now, true);
        } else if dirty {
            dirty = false;
            // The spare chunk and delta copy buffers first, or the trim could not give them back.
            budget.drop_spares();
            xfer_core::delta::drop_spare_copy_buffers();
            tokio::task::spawn_blocking(trim).await.ok();
        }
    }
}

/// Hands freed heap memory back to the kernel.
fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists, under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Free heap memory an arena keeps at its top rather than handing back at once: a batch of
/// small files decoded and stored frees a few MiB together, and at glibc's fixed 128 KiB the
/// next batch faulted all of it in again, a page fault and a zeroed page per 4 KiB stored. The
/// idle [`trim`] still hands it back once the burst is over.
pub const KEPT_FREE_HEAP: usize = 64 << 20;

/// Makes glibc serve every large buffer (a chunk) with its own `mmap` and unmap it when freed,
/// instead of raising its threshold after the first free and carving later chunks out of
/// arenas, which keep the memory after a burst; and keep up to [`KEPT_FREE_HEAP`] of freed
/// small buffers for the next batch. Call once, before the runtime starts.
pub fn prefer_mmap_for_chunks() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt changes a tunable of the allocator under the main arena's lock; other
    // threads' arenas read the plain integers without it, at worst the old value once (the
    // budget's unit test runs beside other tests). `main` calls it before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEPT_FREE_HEAP as libc::c_int);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    #[cfg(target_env = "gnu")]
    fn minor_faults() -> i64 {
        // SAFETY: getrusage only fills the struct it is given.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
            usage.ru_minflt
        }
    }

    #[cfg(target_env = "gnu")]
    #[test]
    fn a_batch_of_small_buffers_freed_together_is_reused_without_faulting_again() {
        // Other tests' threads may run meanwhile: glibc's mallopt takes the arenas' lock.
        prefer_mmap_for_chunks();
        // 4 MiB of small files' bytes, as a decoded batch holds them.
        let batch = || {
            (0..256)
                .map(|i| vec![i as u8; 16 << 10])
                .collect::<Vec<_>>()
        };
        drop(std::hint::black_box(batch()));
        let before = minor_faults();
        for _ in 0..4 {
            drop(std::hint::black_box(batch()));
        }
        let faults = minor_faults() - before;
        // Handed back after each batch, the 4 MiB faulted in again: 1,024 pages a batch.
        assert!(
            faults < 256,
            "{faults} page faults for memory freed and reused"
        );
    }

    #[test]
    fn the_default_is_a_quarter_between_floor_and_cap() {
        assert_eq!(default_for(None), DEFAULT_FLOOR);
        assert_eq!(default_for(Some(128 * MIB)), DEFAULT_FLOOR);
        assert_eq!(default_for(Some(2048 * MIB)), 512 * MIB);
        assert_eq!(default_for(Some(64 * 1024 * MIB)), DEFAULT_CAP);
        assert_eq!(MIN_MAX_MEMORY, 34 * MIB);
    }

    #[test]
    fn this_machine_has_memory() {
        let usable = usable_memory().expect("/proc/meminfo");
        assert!(usable > 0);
        let default = default_max_memory();
        assert!((DEFAULT_FLOOR..=DEFAULT_CAP).contains(&default));
    }
}
