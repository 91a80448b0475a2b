//! When simulated devices are available. A device that is not available does not check in.
//!
//! Simulated time is counted in rounds (round `r` = the round that produces model version `r`,
//! 1-based); a deployment's availability is wall-clock (charging, idle, night), which the server's
//! selection window handles the same way.

use rand::{Rng, SeedableRng, rngs::StdRng};

/// An availability model over devices that each hold one class.
#[derive(Debug, Clone, PartialEq)]
pub enum Availability {
    /// Model (a): devices holding classes `0..classes` are available for `period` rounds, then
    /// the others for `period` rounds, and so on (the group with classes `0..classes` first).
    AlternatingGroups { classes: u8, period: u32 },
    /// Model (b): a simulated day of `day` rounds; device `i` is available `hours` consecutive
    /// rounds a day starting at `offsets[i]` (its local evening, say), wrapping around midnight.
    DailyWindow { day: u32, hours: u32, offsets: Vec<u32> },
}

impl Availability {
    /// Model (b) with time zones that follow the data: device `i` holding class `c` starts its
    /// window at `c * day / 10` plus a jitter of up to `day / 10` rounds (seeded), so at any hour
    /// some classes are over-represented, as when a population's data varies with its region.
    pub fn daily(classes: &[u8], day: u32, hours: u32, seed: u64) -> Availability {
        let mut rng = StdRng::seed_from_u64(seed);
        let zone = (day / 10).max(1);
        let offsets = classes
            .iter()
            .map(|&c| (u32::from(c) * day / 10 + rng.random_range(0..zone)) % day)
            .collect();
        Availability::DailyWindow { day, hours, offsets }
    }

    /// Whether device `device` (holding class `class`) is available in round `round` (1-based).
    pub fn is_available(&self, device: usize, class: u8, round: u32) -> bool {
        let t = round.saturating_sub(1);
        match self {
            Availability::AlternatingGroups { classes, period } => {
                let first_group = (t / period.max(&1)).is_multiple_of(2);
                (class < *classes) == first_group
            }
            Availability::DailyWindow { day, hours, offsets } => {
                let hour = t % day;
                (hour + day - offsets[device] % day) % day < *hours
            }
        }
    }

    /// Rounds after which the pattern repeats (both groups' turns, or one day): the scenario's
    /// summary covers the last such period.
    pub fn cycle(&self) -> u32 {
        match self {
            Availability::AlternatingGroups { period, .. } => 2 * period,
            Availability::DailyWindow { day, .. } => *day,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Availability::AlternatingGroups { classes, period } => {
                format!("alternating groups: classes 0..{classes} for {period} rounds, then the rest")
            }
            Availability::DailyWindow { day, hours, .. } => {
                format!("daily window: {hours} of every {day} rounds per device, zones by class")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternating_groups_take_turns() {
        let a = Availability::AlternatingGroups {
            classes: 5,
            period: 10,
        };
        for r in 1..=10 {
            assert!(a.is_available(0, 4, r) && !a.is_available(0, 5, r), "round {r}");
        }
        for r in 11..=20 {
            assert!(!a.is_available(0, 4, r) && a.is_available(0, 9, r), "round {r}");
        }
        assert!(a.is_available(0, 0, 21));
    }

    #[test]
    fn daily_window_is_hours_long_and_wraps() {
        let a = Availability::DailyWindow {
            day: 24,
            hours: 6,
            offsets: vec![0, 20],
        };
        let on = |d: usize| (1..=24).filter(|&r| a.is_available(d, 0, r)).collect::<Vec<_>>();
        assert_eq!(on(0), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(on(1), vec![1, 2, 21, 22, 23, 24]);
        // The next day repeats.
        assert!(a.is_available(1, 0, 45) && !a.is_available(1, 0, 27));
    }

    #[test]
    fn daily_zones_follow_the_class() {
        let classes: Vec<u8> = (0..100).map(|i| (i % 10) as u8).collect();
        let Availability::DailyWindow { offsets, .. } = Availability::daily(&classes, 40, 8, 7) else {
            unreachable!()
        };
        for (i, &o) in offsets.iter().enumerate() {
            let start = u32::from(classes[i]) * 4;
            assert!((start..start + 4).contains(&o), "device {i} offset {o}");
        }
    }
}
