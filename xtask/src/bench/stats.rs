//! Medians and their bootstrap intervals: a bench's ratios are medians of noisy phases, and a
//! median without its interval reads as more certain than it is.

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Percent change of `a` against `d`.
pub fn pct(a: f64, d: f64) -> f64 {
    (a / d - 1.0) * 100.0
}

/// A seeded xorshift: the intervals are the same for the same phases.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn resample(&mut self, v: &[f64]) -> Vec<f64> {
        (0..v.len()).map(|_| v[self.below(v.len())]).collect()
    }
}

const RESAMPLES: usize = 2000;

/// The 2.5th and 97.5th percentiles of `stat` over bootstrap resamples.
fn interval(mut stat: impl FnMut(&mut Rng) -> Option<f64>) -> Option<(f64, f64)> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut s: Vec<f64> = (0..RESAMPLES).filter_map(|_| stat(&mut rng)).collect();
    s.retain(|x| x.is_finite());
    if s.len() < RESAMPLES / 2 {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    Some((at(0.025), at(0.975)))
}

/// 95% interval of `pct(median(attached), median(detached))`, each side resampled on its own.
pub fn ratio_interval(detached: &[f64], attached: &[f64]) -> Option<(f64, f64)> {
    if detached.len() < 2 || attached.len() < 2 {
        return None;
    }
    interval(|r| {
        let d = median(r.resample(detached))?;
        let a = median(r.resample(attached))?;
        Some(pct(a, d))
    })
}

/// 95% interval of a median of values (the per-pair ratios), resampled.
pub fn median_interval(v: &[f64]) -> Option<(f64, f64)> {
    if v.len() < 2 {
        return None;
    }
    interval(|r| median(r.resample(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn intervals_cover_the_median_and_shrink_with_more_phases() {
        let d: Vec<f64> = (0..20).map(|i| 100.0 + f64::from(i % 7)).collect();
        let a: Vec<f64> = (0..20).map(|i| 95.0 + f64::from(i % 7)).collect();
        let (lo, hi) = ratio_interval(&d, &a).unwrap();
        let m = pct(median(a.clone()).unwrap(), median(d.clone()).unwrap());
        assert!(lo <= m && m <= hi, "{lo} {m} {hi}");
        assert!(hi < 0.0, "a 5% loss in every phase is certain: {lo} {hi}");
        let few = ratio_interval(&d[..4], &a[..4]).unwrap();
        assert!(few.1 - few.0 >= hi - lo);
    }
}
