//! Block-cyclic data: the block schedule and the per-block rules of MM-PSGD and MC-PSGD
//! (Ding et al., "Distributed Optimization over Block-Cyclic Data", arXiv 2002.07454).
//!
//! Time is cycles (days) of blocks (day, night); within a block the devices' data follow a
//! block-specific distribution, so a single global model is biased to the latest block. The server
//! keeps one predictor `p_m` per block, the running mean of the model over every round of block `m`
//! across cycles, and serves the predictor of the current block. MC-PSGD also keeps a block-separate
//! chain `y_m` per block and feeds whichever of `x`, `y_m` has the lower mean reported loss into `p_m`.
//!
//! This module holds the pure parts: the schedule (config, validation, the position of a round), the
//! running-mean update, the MC choice and the tensor names of an MC upload. The server persists and
//! applies them; the SDK trains the chains.

use serde::{Deserialize, Serialize};

use crate::tensors::{NamedTensors, TensorSpec};

/// Prefix of the chain update `y_m_after - y_m_before` inside an MC-PSGD upload: tensor `w` of the
/// model travels as `chain/w` next to the plain `w` (the update of `x`).
pub const CHAIN_PREFIX: &str = "chain/";
/// `[1]` tensor of an MC-PSGD upload: the device's mean loss, on its block data, of the model it trained from `x`.
pub const LOSS_X: &str = "loss/x";
/// `[1]` tensor of an MC-PSGD upload: the device's mean loss, on its block data, of the model it trained from `y_m`.
pub const LOSS_CHAIN: &str = "loss/chain";

/// Which blocks make up a cycle and when each one is active.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum BlockSchedule {
    /// Simulation: block `m` lasts `rounds` committed rounds, then the next block starts; after the
    /// last block the next cycle starts with the first. Abandoned rounds do not advance the schedule.
    Rounds { blocks: Vec<RoundBlock> },
    /// Deployment: each block starts at a local time of the cycle and lasts until the next block
    /// starts (the last one wraps to the first block of the next cycle). A round belongs to the block
    /// in which it opened.
    WallClock {
        /// The schedule's time zone as a fixed offset from UTC, `"+HH:MM"` or `"-HH:MM"`.
        utc_offset: String,
        /// Length of a cycle; a day unless stated. Cycles are aligned to local midnight of
        /// 1970-01-01 (so with 604800, a weekly cycle, they start on Thursdays).
        #[serde(default = "one_day")]
        cycle_secs: u64,
        /// In order of their start times.
        blocks: Vec<ClockBlock>,
    },
}

fn one_day() -> u64 {
    86_400
}

/// A block of a round-count schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RoundBlock {
    pub name: String,
    pub rounds: u32,
}

/// A block of a wall-clock schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClockBlock {
    pub name: String,
    /// Local start time within the cycle, `"HH:MM"` or `"HH:MM:SS"` (hours may exceed 23 in cycles
    /// longer than a day).
    pub start: String,
}

/// Where a round sits in the schedule. `cycle` counts from 0 (wall clock: cycles since the task's
/// first round opened), `round_in_block` from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BlockPosition {
    pub cycle: i64,
    pub block: usize,
    pub round_in_block: i64,
}

impl BlockSchedule {
    /// Block names in cycle order.
    pub fn names(&self) -> Vec<&str> {
        match self {
            BlockSchedule::Rounds { blocks } => blocks.iter().map(|b| b.name.as_str()).collect(),
            BlockSchedule::WallClock { blocks, .. } => blocks.iter().map(|b| b.name.as_str()).collect(),
        }
    }

    /// Index of the block called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names().iter().position(|n| *n == name)
    }

    /// Checks the schedule; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let names = self.names();
        if names.is_empty() {
            return Err("`schedule.blocks` is empty".into());
        }
        for (i, name) in names.iter().enumerate() {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
            {
                return Err(format!(
                    "block name `{name}` must be 1-64 characters of ASCII letters, digits, `-` or `_`"
                ));
            }
            if names[..i].contains(name) {
                return Err(format!("block name `{name}` is used twice"));
            }
        }
        match self {
            BlockSchedule::Rounds { blocks } => {
                if let Some(b) = blocks.iter().find(|b| b.rounds == 0) {
                    return Err(format!("block `{}` must last at least 1 round", b.name));
                }
            }
            BlockSchedule::WallClock {
                utc_offset,
                cycle_secs,
                blocks,
            } => {
                parse_utc_offset(utc_offset)?;
                if *cycle_secs == 0 {
                    return Err("`schedule.cycle_secs` must be >= 1".into());
                }
                let mut previous: Option<u64> = None;
                for b in blocks {
                    let start = parse_start(&b.start)?;
                    if start >= *cycle_secs {
                        return Err(format!(
                            "block `{}` starts at {} = {start} s, not inside the {cycle_secs}-second cycle",
                            b.name, b.start
                        ));
                    }
                    if previous.is_some_and(|p| start <= p) {
                        return Err(format!(
                            "block `{}` starts at {}, not after the block before it: list blocks in order of their start",
                            b.name, b.start
                        ));
                    }
                    previous = Some(start);
                }
            }
        }
        Ok(())
    }

    /// Round-count schedule: the position of the round after one at `last` (None: the first round).
    /// Wall-clock schedules are placed by time instead, see [`BlockSchedule::clock_slot`].
    pub fn next_by_rounds(&self, last: Option<BlockPosition>) -> BlockPosition {
        let BlockSchedule::Rounds { blocks } = self else {
            panic!("next_by_rounds on a wall-clock schedule");
        };
        let Some(last) = last else {
            return BlockPosition {
                cycle: 0,
                block: 0,
                round_in_block: 1,
            };
        };
        if last.round_in_block < i64::from(blocks[last.block].rounds) {
            return BlockPosition {
                round_in_block: last.round_in_block + 1,
                ..last
            };
        }
        let block = (last.block + 1) % blocks.len();
        BlockPosition {
            cycle: last.cycle + i64::from(block == 0),
            block,
            round_in_block: 1,
        }
    }

    /// Wall-clock schedule: `(absolute cycle number, block index)` at Unix time `unix_ms`. The cycle
    /// number counts cycles since the epoch; cycle `c` begins at the first block's start time.
    pub fn clock_slot(&self, unix_ms: i64) -> (i64, usize) {
        let BlockSchedule::WallClock {
            utc_offset,
            cycle_secs,
            blocks,
        } = self
        else {
            panic!("clock_slot on a round-count schedule");
        };
        let offset = parse_utc_offset(utc_offset).expect("validated schedule");
        let starts: Vec<i64> = blocks
            .iter()
            .map(|b| parse_start(&b.start).expect("validated schedule") as i64 * 1000)
            .collect();
        let cycle_ms = *cycle_secs as i64 * 1000;
        let since_first = unix_ms + offset * 1000 - starts[0];
        let cycle = since_first.div_euclid(cycle_ms);
        let within = since_first.rem_euclid(cycle_ms) + starts[0];
        let block = starts.iter().rposition(|&s| s <= within).unwrap_or(0);
        (cycle, block)
    }
}

/// `"+HH:MM"` / `"-HH:MM"` (also `"Z"`) as seconds east of UTC.
pub fn parse_utc_offset(s: &str) -> Result<i64, String> {
    let bad = || format!("`schedule.utc_offset` must look like \"+08:00\" or \"-05:30\", got `{s}`");
    if s == "Z" {
        return Ok(0);
    }
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let (h, m): (i64, i64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 14 || m > 59 || rest.len() != 5 {
        return Err(bad());
    }
    Ok(sign * (h * 3600 + m * 60))
}

/// `"HH:MM"` or `"HH:MM:SS"` as seconds.
pub fn parse_start(s: &str) -> Result<u64, String> {
    let bad = || format!("block start must look like \"08:00\" or \"08:00:30\", got `{s}`");
    let parts: Vec<&str> = s.split(':').collect();
    let hours_ok = (2..=3).contains(&parts[0].len());
    if !(2..=3).contains(&parts.len()) || !hours_ok || parts[1..].iter().any(|p| p.len() != 2) {
        return Err(bad());
    }
    let nums: Vec<u64> = parts
        .iter()
        .map(|p| p.parse::<u64>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if nums[1..].iter().any(|&v| v > 59) {
        return Err(bad());
    }
    Ok(nums[0] * 3600 + nums[1] * 60 + nums.get(2).copied().unwrap_or(0))
}

/// The block part of a device's assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BlockAssignment {
    /// The round's block: the device trains on the data of this block.
    pub name: String,
    pub index: u32,
    pub cycle: i64,
    pub round_in_block: i64,
    /// MC-PSGD only: also train from this version of the block's chain `y_m` (download it from
    /// `/v1/tasks/{id}/blocks/{name}/chain?version=N`; 0 is the task's initial model) with step
    /// `chain_learning_rate`, and upload per [`mc_upload_specs`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_learning_rate: Option<f32>,
}

/// One committed round of a block-cyclic task, as `/v1/tasks/{id}/blocks` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BlockRoundInfo {
    pub round_id: i64,
    pub block: String,
    pub cycle: i64,
    pub round_in_block: i64,
    /// `r_m` after this round.
    pub block_rounds: i64,
    /// What fed the predictor (`x` in MM-PSGD).
    pub chosen: ChainChoice,
    /// MC-PSGD: sample-weighted mean losses the devices reported for `x` and `y_m`.
    pub mean_loss_x: Option<f64>,
    pub mean_loss_chain: Option<f64>,
}

/// A block's predictor and chain as they stand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BlockInfo {
    pub name: String,
    /// `r_m`: committed rounds of this block over all cycles (0: no predictor yet).
    pub rounds: i64,
    /// Round that last updated the predictor (its ETag on the predictor endpoint).
    pub last_round_id: Option<i64>,
    /// MC-PSGD: version of `y_m` devices train from next (0 = initial model).
    pub chain_version: Option<i64>,
}

/// Schedule state of a block-cyclic task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BlockStatus {
    /// The block meant for now, whose predictor `/v1/tasks/{id}/predictor` serves: by the clock
    /// (wall-clock schedules), else the open round's block or the next round's.
    pub current: String,
    /// Schedule position of the open round (None between rounds and after the last one).
    pub round_position: Option<BlockPosition>,
    pub blocks: Vec<BlockInfo>,
    /// Every committed round, oldest first.
    pub history: Vec<BlockRoundInfo>,
}

/// Which chain an MC-PSGD round feeds into the block's predictor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ChainChoice {
    /// The block-mixed chain `x` (always, in MM-PSGD).
    X,
    /// The block-separate chain `y_m`.
    Chain,
}

/// MC-PSGD step 3: `y_m` if its mean reported loss is strictly lower than `x`'s, else `x` (a tie
/// keeps `x`, so MC-PSGD falls back to MM-PSGD's choice when the losses cannot tell them apart).
pub fn choose(mean_loss_x: f64, mean_loss_chain: f64) -> ChainChoice {
    if mean_loss_chain < mean_loss_x {
        ChainChoice::Chain
    } else {
        ChainChoice::X
    }
}

/// Which of a block's rounds its predictor `p_m` averages. The paper's rule is [`All`]; the others
/// are fedhive's options for a model that is still improving, where the all-round mean keeps the
/// early weak models and lags the last iterate.
///
/// [`All`]: PredictorAverage::All
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PredictorAverage {
    /// Running mean over every round of the block, across cycles (the paper's rule).
    #[default]
    All,
    /// Running mean over the block's rounds from cycle `after_cycles` on (cycles count from 0):
    /// `r_m` and `p_m` restart at the block's first round of that cycle.
    Tail { after_cycles: u32 },
    /// Exponential average `p_m = decay * p_m + (1 - decay) * u`; the block's first round sets `p_m = u`.
    Ema { decay: f32 },
}

impl PredictorAverage {
    /// A message naming the bad value, for the task config's validation.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            PredictorAverage::All => Ok(()),
            PredictorAverage::Tail { after_cycles } if after_cycles >= 1 => Ok(()),
            PredictorAverage::Tail { .. } => {
                Err("`strategy.predictor_average.after_cycles` must be >= 1 (0 is `all`)".into())
            }
            PredictorAverage::Ema { decay } if decay > 0.0 && decay < 1.0 => Ok(()),
            PredictorAverage::Ema { decay } => Err(format!(
                "`strategy.predictor_average.decay` must lie strictly between 0 and 1, got {decay}"
            )),
        }
    }

    /// Whether a round in `cycle` starts its block's average anew, the block's previous committed
    /// round having been in `previous_cycle`.
    pub fn restarts(&self, previous_cycle: i64, cycle: i64) -> bool {
        match *self {
            PredictorAverage::Tail { after_cycles } => {
                let k = i64::from(after_cycles);
                previous_cycle < k && cycle >= k
            }
            PredictorAverage::All | PredictorAverage::Ema { .. } => false,
        }
    }

    /// Step 4 under this window: folds `u` into `p_m`, `r_m` counting this round (from 2: the
    /// block's first round, or the first after a restart, sets `p_m = u` without calling this).
    pub fn update(&self, p: &mut NamedTensors, u: &NamedTensors, r_m: u64) {
        match *self {
            PredictorAverage::All | PredictorAverage::Tail { .. } => running_mean_update(p, u, r_m),
            PredictorAverage::Ema { decay } => exponential_update(p, u, decay),
        }
    }
}

/// `p_m = decay * p_m + (1 - decay) * u`, per value in f64 and rounded once (deterministic).
pub fn exponential_update(p: &mut NamedTensors, u: &NamedTensors, decay: f32) {
    let b = f64::from(decay);
    for (name, t) in &mut p.0 {
        let u = &u.0[name].data;
        for (pv, &uv) in t.data.iter_mut().zip(u) {
            *pv = (b * f64::from(*pv) + (1.0 - b) * f64::from(uv)) as f32;
        }
    }
}

/// Step 4: `p_m += (u - p_m) / r_m` with `r_m` the count after this round (`r_m = 1` makes `p_m = u`).
/// Computed per value in f64 and rounded once, so it is deterministic given `p_m`, `u` and `r_m`.
pub fn running_mean_update(p: &mut NamedTensors, u: &NamedTensors, r_m: u64) {
    assert!(r_m >= 1, "r_m counts this round");
    let r = r_m as f64;
    for (name, t) in &mut p.0 {
        let u = &u.0[name].data;
        for (pv, &uv) in t.data.iter_mut().zip(u) {
            let pf = f64::from(*pv);
            *pv = (pf + (f64::from(uv) - pf) / r) as f32;
        }
    }
}

/// Tensors of an MC-PSGD upload: the model's tensors (update of `x`), the same again under
/// [`CHAIN_PREFIX`] (update of `y_m`), and the two `[1]` losses.
pub fn mc_upload_specs(model: &[TensorSpec]) -> Vec<TensorSpec> {
    let mut specs = model.to_vec();
    specs.extend(model.iter().map(|s| TensorSpec {
        name: format!("{CHAIN_PREFIX}{}", s.name),
        shape: s.shape.clone(),
    }));
    for name in [LOSS_X, LOSS_CHAIN] {
        specs.push(TensorSpec {
            name: name.to_string(),
            shape: vec![1],
        });
    }
    specs
}

/// Moves the tensors named `prefix + name` out of `all` into a model of their own, without the prefix.
pub fn take_prefixed(all: &mut NamedTensors, prefix: &str) -> NamedTensors {
    let names: Vec<String> = all.0.keys().filter(|n| n.starts_with(prefix)).cloned().collect();
    let mut out = NamedTensors::default();
    for name in names {
        let t = all.0.remove(&name).expect("listed");
        out.0.insert(name[prefix.len()..].to_string(), t);
    }
    out
}

/// Adds `model`'s tensors to `all` under `prefix`.
pub fn put_prefixed(all: &mut NamedTensors, prefix: &str, model: NamedTensors) {
    for (name, t) in model.0 {
        all.0.insert(format!("{prefix}{name}"), t);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::tensors::Tensor;

    fn rounds(spec: &[(&str, u32)]) -> BlockSchedule {
        BlockSchedule::Rounds {
            blocks: spec
                .iter()
                .map(|(n, r)| RoundBlock {
                    name: n.to_string(),
                    rounds: *r,
                })
                .collect(),
        }
    }

    fn clock(offset: &str, cycle_secs: u64, spec: &[(&str, &str)]) -> BlockSchedule {
        BlockSchedule::WallClock {
            utc_offset: offset.into(),
            cycle_secs,
            blocks: spec
                .iter()
                .map(|(n, s)| ClockBlock {
                    name: n.to_string(),
                    start: s.to_string(),
                })
                .collect(),
        }
    }

    fn pos(cycle: i64, block: usize, round_in_block: i64) -> BlockPosition {
        BlockPosition {
            cycle,
            block,
            round_in_block,
        }
    }

    fn w(data: Vec<f32>) -> NamedTensors {
        let mut m = BTreeMap::new();
        m.insert(
            "w".to_string(),
            Tensor {
                shape: vec![data.len()],
                data,
            },
        );
        NamedTensors(m)
    }

    #[test]
    fn round_schedule_walks_blocks_and_wraps_cycles() {
        let s = rounds(&[("day", 2), ("night", 1)]);
        let mut at = s.next_by_rounds(None);
        let mut seen = vec![at];
        for _ in 0..6 {
            at = s.next_by_rounds(Some(at));
            seen.push(at);
        }
        assert_eq!(
            seen,
            vec![
                pos(0, 0, 1),
                pos(0, 0, 2),
                pos(0, 1, 1),
                pos(1, 0, 1),
                pos(1, 0, 2),
                pos(1, 1, 1),
                pos(2, 0, 1)
            ]
        );
    }

    #[test]
    fn single_block_schedule_counts_cycles() {
        let s = rounds(&[("only", 1)]);
        assert_eq!(s.next_by_rounds(Some(pos(4, 0, 1))), pos(5, 0, 1));
    }

    #[test]
    fn wall_clock_day_and_night_in_a_time_zone() {
        // day 08:00-20:00, night 20:00-08:00 at UTC+08:00. 1970-01-02 00:00 UTC = 08:00 local: day.
        let s = clock("+08:00", 86_400, &[("day", "08:00"), ("night", "20:00")]);
        let h = 3_600_000i64;
        let day2 = 24 * h;
        assert_eq!(s.clock_slot(day2), (1, 0), "08:00 local starts day of cycle 1");
        assert_eq!(
            s.clock_slot(day2 - 1),
            (0, 1),
            "07:59:59.999 local is still the night of cycle 0"
        );
        assert_eq!(s.clock_slot(day2 + 12 * h - 1), (1, 0));
        assert_eq!(s.clock_slot(day2 + 12 * h), (1, 1), "20:00 local starts night");
        assert_eq!(
            s.clock_slot(day2 + 23 * h),
            (1, 1),
            "07:00 local next day is still night"
        );
        assert_eq!(s.clock_slot(day2 + 24 * h), (2, 0));
        // Negative offsets and times before the first block's start in the first cycle.
        let s = clock("-05:30", 86_400, &[("a", "00:00"), ("b", "06:00")]);
        assert_eq!(
            s.clock_slot(0),
            (-1, 1),
            "1969-12-31 18:30 local is block b of cycle -1"
        );
        assert_eq!(s.clock_slot(5 * h + 30 * 60_000), (0, 0), "midnight local");
    }

    #[test]
    fn wall_clock_short_cycles_with_seconds() {
        let s = clock("Z", 4, &[("a", "00:00:00"), ("b", "00:00:02")]);
        assert_eq!(s.clock_slot(0), (0, 0));
        assert_eq!(s.clock_slot(1_999), (0, 0));
        assert_eq!(s.clock_slot(2_000), (0, 1));
        assert_eq!(s.clock_slot(4_000), (1, 0));
        assert_eq!(s.clock_slot(10_500), (2, 1));
    }

    #[test]
    fn schedules_are_validated() {
        let bad = [
            (rounds(&[]), "empty"),
            (rounds(&[("a", 1), ("a", 2)]), "twice"),
            (rounds(&[("a", 0)]), "at least 1 round"),
            (rounds(&[("a b", 1)]), "must be 1-64"),
            (clock("8:00", 86_400, &[("a", "08:00")]), "utc_offset"),
            (clock("+08:00", 86_400, &[("a", "8am")]), "block start"),
            (
                clock("+08:00", 86_400, &[("a", "20:00"), ("b", "08:00")]),
                "not after",
            ),
            (clock("+08:00", 86_400, &[("a", "24:00")]), "not inside"),
            (clock("+08:00", 0, &[("a", "00:00")]), "cycle_secs"),
        ];
        for (schedule, expected) in bad {
            let err = schedule.validate().unwrap_err();
            assert!(err.contains(expected), "{schedule:?}: {err}");
        }
        rounds(&[("day", 3), ("night", 2)]).validate().unwrap();
        clock("-05:30", 604_800, &[("weekday", "00:00"), ("weekend", "72:00")])
            .validate()
            .unwrap();
    }

    #[test]
    fn running_mean_matches_hand_computation() {
        // u = 1, 2, 6 -> p = 1, 1.5, 3.
        let mut p = w(vec![0.0, 10.0]);
        running_mean_update(&mut p, &w(vec![1.0, -1.0]), 1);
        assert_eq!(p, w(vec![1.0, -1.0]), "the first round sets p_m = u");
        running_mean_update(&mut p, &w(vec![2.0, 3.0]), 2);
        assert_eq!(p, w(vec![1.5, 1.0]));
        running_mean_update(&mut p, &w(vec![6.0, 1.0]), 3);
        assert_eq!(p, w(vec![3.0, 1.0]));
    }

    #[test]
    fn running_mean_equals_plain_mean_of_many_rounds() {
        let us: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.25 - 1.0).collect();
        let mut p = w(vec![0.0]);
        for (i, &u) in us.iter().enumerate() {
            running_mean_update(&mut p, &w(vec![u]), i as u64 + 1);
        }
        let exact = us.iter().map(|&u| f64::from(u)).sum::<f64>() / us.len() as f64;
        assert!((f64::from(p.0["w"].data[0]) - exact).abs() < 1e-5);
    }

    #[test]
    fn mc_choice_takes_the_lower_loss_and_x_on_ties() {
        assert_eq!(choose(1.0, 0.5), ChainChoice::Chain);
        assert_eq!(choose(0.5, 1.0), ChainChoice::X);
        assert_eq!(choose(0.7, 0.7), ChainChoice::X);
    }

    #[test]
    fn mc_upload_specs_and_prefixes_round_trip() {
        let model = vec![TensorSpec {
            name: "w".into(),
            shape: vec![2],
        }];
        let names: Vec<String> = mc_upload_specs(&model).into_iter().map(|s| s.name).collect();
        assert_eq!(names, vec!["w", "chain/w", "loss/x", "loss/chain"]);
        let mut all = w(vec![1.0, 2.0]);
        put_prefixed(&mut all, CHAIN_PREFIX, w(vec![3.0, 4.0]));
        let chain = take_prefixed(&mut all, CHAIN_PREFIX);
        assert_eq!((all, chain), (w(vec![1.0, 2.0]), w(vec![3.0, 4.0])));
    }

    /// Feeds `us` (one value per round, all in cycle `cycles[i]`) through a window as the server
    /// does: a first round or a restart sets `p = u`, later rounds call `update`.
    fn predictor_after(window: PredictorAverage, us: &[f32], cycles: &[i64]) -> (f32, u64) {
        let mut p: Option<(NamedTensors, u64, i64)> = None;
        for (&u, &cycle) in us.iter().zip(cycles) {
            p = Some(match p {
                Some((mut p, r, previous)) if !window.restarts(previous, cycle) => {
                    window.update(&mut p, &w(vec![u]), r + 1);
                    (p, r + 1, cycle)
                }
                _ => (w(vec![u]), 1, cycle),
            });
        }
        let (p, r, _) = p.expect("at least one round");
        (p.0["w"].data[0], r)
    }

    #[test]
    fn all_averages_every_round_of_the_block() {
        let (p, r) = predictor_after(PredictorAverage::All, &[1.0, 2.0, 3.0, 6.0], &[0, 1, 2, 3]);
        assert_eq!((p, r), (3.0, 4));
    }

    #[test]
    fn tail_restarts_once_at_the_first_round_of_cycle_k() {
        let tail = PredictorAverage::Tail { after_cycles: 2 };
        assert!(!tail.restarts(0, 1));
        assert!(tail.restarts(1, 2), "the block's first round in cycle 2 restarts");
        assert!(tail.restarts(0, 3), "also when the block had no round in cycle 2");
        assert!(!tail.restarts(2, 2) && !tail.restarts(2, 3), "once only");
        // Rounds of cycles 0 and 1 (values 100, 100) are dropped; cycles 2, 2, 3 average to 2.
        let (p, r) = predictor_after(tail, &[100.0, 100.0, 1.0, 2.0, 3.0], &[0, 1, 2, 2, 3]);
        assert_eq!((p, r), (2.0, 3));
    }

    #[test]
    fn ema_weights_recent_rounds_by_decay() {
        let ema = PredictorAverage::Ema { decay: 0.5 };
        assert!(!ema.restarts(0, 10));
        // p = 4; then 0.5 * 4 + 0.5 * 2 = 3; then 0.5 * 3 + 0.5 * 1 = 2.
        let (p, r) = predictor_after(ema, &[4.0, 2.0, 1.0], &[0, 1, 2]);
        assert_eq!((p, r), (2.0, 3));
    }

    #[test]
    fn windows_refuse_values_that_average_nothing() {
        assert!(PredictorAverage::Tail { after_cycles: 0 }.validate().is_err());
        assert!(PredictorAverage::Ema { decay: 1.0 }.validate().is_err());
        assert!(PredictorAverage::Ema { decay: 0.0 }.validate().is_err());
        assert!(PredictorAverage::Ema { decay: f32::NAN }.validate().is_err());
        assert!(PredictorAverage::Ema { decay: 0.9 }.validate().is_ok());
        assert!(PredictorAverage::Tail { after_cycles: 1 }.validate().is_ok());
    }

    #[test]
    fn predictor_average_reads_from_task_config_json() {
        let parse = |v: serde_json::Value| serde_json::from_value::<PredictorAverage>(v).unwrap();
        assert_eq!(parse(serde_json::json!({"kind": "all"})), PredictorAverage::All);
        assert_eq!(
            parse(serde_json::json!({"kind": "tail", "after_cycles": 3})),
            PredictorAverage::Tail { after_cycles: 3 }
        );
        assert_eq!(
            parse(serde_json::json!({"kind": "ema", "decay": 0.8})),
            PredictorAverage::Ema { decay: 0.8 }
        );
    }
}
