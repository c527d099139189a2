//! Replica selection: priority first, weight within a priority (pure logic).
//!
//! Replicas are grouped by `priority` (lower first). For each request the best
//! priority that has a usable replica supplies the first choice, picked by
//! smooth weighted round-robin (nginx's algorithm: every usable member gains
//! its weight, the largest current value wins and pays the group total), so
//! weights 3:1 give `a a b a` rather than bursts. The rest of the plan, used on
//! failover, is the other usable members of that group by weight, then each
//! lower priority the same way. Each core owns its selector: no shared state.

/// The replica indexes to try for one request, in order. Fixed size, no allocation.
#[derive(Debug, Clone)]
pub struct Plan {
    ids: [u8; crate::config::MAX_REPLICAS],
    len: usize,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            ids: [0; crate::config::MAX_REPLICAS],
            len: 0,
        }
    }
}

impl Plan {
    /// The replicas, by index into the bucket, in order.
    pub fn as_slice(&self) -> &[u8] {
        &self.ids[..self.len]
    }
    /// No replica is usable.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn push(&mut self, id: usize) {
        if self.len < self.ids.len() && !self.as_slice().contains(&(id as u8)) {
            self.ids[self.len] = id as u8;
            self.len += 1;
        }
    }
}

#[derive(Debug, Clone)]
/// Plans replicas for one bucket on one core (smooth weighted round-robin).
pub struct Selector {
    /// Replica indexes grouped by priority, best first; each group sorted by weight, heaviest first.
    groups: Vec<Vec<usize>>,
    weights: Vec<i64>,
    current: Vec<i64>,
}

impl Selector {
    /// `replicas[i] = (priority, weight)`.
    pub fn new(replicas: &[(u32, u32)]) -> Selector {
        let mut order: Vec<usize> = (0..replicas.len()).collect();
        order.sort_by_key(|&i| (replicas[i].0, std::cmp::Reverse(replicas[i].1), i));
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for i in order {
            match groups.last_mut() {
                Some(g) if replicas[g[0]].0 == replicas[i].0 => g.push(i),
                _ => groups.push(vec![i]),
            }
        }
        Selector {
            groups,
            weights: replicas.iter().map(|r| r.1.max(1) as i64).collect(),
            current: vec![0; replicas.len()],
        }
    }

    /// Fills `plan` with the usable replicas in the order to try them.
    pub fn plan(&mut self, usable: impl Fn(usize) -> bool, plan: &mut Plan) {
        plan.len = 0;
        for group in &self.groups {
            if plan.is_empty() {
                // Smooth weighted round-robin among the usable members of the best group.
                let mut total = 0;
                let mut best: Option<usize> = None;
                for &i in group {
                    if !usable(i) {
                        continue;
                    }
                    self.current[i] += self.weights[i];
                    total += self.weights[i];
                    if best.is_none_or(|b| self.current[i] > self.current[b]) {
                        best = Some(i);
                    }
                }
                if let Some(b) = best {
                    self.current[b] -= total;
                    plan.push(b);
                }
            }
            for &i in group {
                if usable(i) {
                    plan.push(i);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_order_then_fallbacks() {
        let mut s = Selector::new(&[(2, 1), (1, 1), (3, 1)]);
        let mut p = Plan::default();
        s.plan(|_| true, &mut p);
        assert_eq!(p.as_slice(), &[1, 0, 2]);
        s.plan(|i| i != 1, &mut p);
        assert_eq!(p.as_slice(), &[0, 2]);
        s.plan(|_| false, &mut p);
        assert!(p.is_empty());
    }

    #[test]
    fn weights_are_smooth_and_exact() {
        let mut s = Selector::new(&[(1, 3), (1, 1), (2, 1)]);
        let mut p = Plan::default();
        let mut firsts = Vec::new();
        let mut counts = [0; 3];
        for _ in 0..400 {
            s.plan(|_| true, &mut p);
            counts[p.as_slice()[0] as usize] += 1;
            firsts.push(p.as_slice()[0]);
            assert_eq!(p.as_slice().len(), 3);
            assert_eq!(p.as_slice()[2], 2, "lower priority is the last resort");
        }
        assert_eq!(counts, [300, 100, 0]);
        assert_eq!(&firsts[..4], &[0, 0, 1, 0]);
    }

    #[test]
    fn unusable_member_drops_out_of_rotation() {
        let mut s = Selector::new(&[(1, 1), (1, 1)]);
        let mut p = Plan::default();
        for _ in 0..5 {
            s.plan(|i| i == 1, &mut p);
            assert_eq!(p.as_slice(), &[1]);
        }
    }
}
