//! Sample statistics: nearest-rank percentiles, medians and rounding.

/// Percentiles and mean of one sample of round-trip times, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Latency {
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

/// Nearest-rank percentiles of a non-empty sample, in its unit.
pub(crate) fn percentiles(mut times: Vec<f64>) -> Latency {
    if times.is_empty() {
        times.push(f64::NAN);
    }
    times.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let idx = ((p * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1;
        times[idx]
    };
    Latency {
        p50: rank(0.50),
        p90: rank(0.90),
        p99: rank(0.99),
        max: rank(1.0),
        mean: times.iter().sum::<f64>() / times.len() as f64,
    }
}

/// Median of the known values, `None` if there are none.
pub(crate) fn median(values: &[Option<f64>]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().flatten().copied().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

/// Rounds to three decimals (for the JSON line).
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
