//! What Linux's `/proc` says about a measured process (its memory).

/// A `kB` field of `/proc/<pid>/status` (`field` with its colon, e.g.
/// `"VmRSS:"` or `"VmHWM:"`), in KiB; `None` when the process is gone or
/// the field is missing.
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// KiB as MB (MiB) with one decimal, `?` when unknown.
pub(crate) fn mb(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| format!("{:.1} MB", k as f64 / 1024.0))
}
