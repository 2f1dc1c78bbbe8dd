//! End-to-end latency: HDR histograms in microseconds, for the whole run and by when each
//! message was sent, that workers ship to the parent as JSON.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The longest latency tracked exactly; anything later is recorded as this.
const MAX_MICROS: u64 = 60_000_000;

#[derive(Clone)]
pub struct Latency(Histogram<u64>);

/// Quantiles of one histogram, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Quantiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Default for Latency {
    fn default() -> Self {
        Self::with_figures(3)
    }
}

impl Latency {
    /// `figures` significant decimal digits: 3 for a run (~140 KB), 2 for a timeline's
    /// slice (~17 KB, 1% resolution).
    fn with_figures(figures: u8) -> Self {
        Self(
            Histogram::new_with_bounds(1, MAX_MICROS, figures)
                .expect("static histogram bounds are valid"),
        )
    }

    pub fn record(&mut self, micros: u64) {
        self.0.saturating_record(micros.clamp(1, MAX_MICROS));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn quantiles(&self) -> Quantiles {
        let h = &self.0;
        Quantiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }

    /// (value, count) pairs of the recorded buckets: how a histogram crosses processes.
    fn pairs(&self) -> Vec<(u64, u64)> {
        self.0
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    fn with_pairs(mut self, pairs: Vec<(u64, u64)>) -> Self {
        for (value, count) in pairs {
            let _ = self.0.record_n(value.clamp(1, MAX_MICROS), count);
        }
        self
    }
}

impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.pairs().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Latency::default().with_pairs(Vec::deserialize(d)?))
    }
}

/// Latency by when each message was sent, in slices of `width_ms`: shows whether a run's
/// tail is one stall, a period (a timer, a commit) or spread evenly. Off when the width is 0.
#[derive(Clone, Default)]
pub struct Timeline {
    width_ms: u64,
    /// Slice start (Unix ms, a multiple of the width) to the latencies sent in it.
    slices: BTreeMap<u64, Latency>,
}

/// One slice of a timeline as the report shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Slice {
    /// Start of the slice, ms after the publishers started.
    pub at_ms: i64,
    #[serde(flatten)]
    pub latency_us: Quantiles,
}

impl Timeline {
    pub fn new(width_ms: u64) -> Self {
        Self {
            width_ms,
            slices: BTreeMap::new(),
        }
    }

    pub fn record(&mut self, sent_us: u64, micros: u64) {
        if self.width_ms == 0 {
            return;
        }
        let at = sent_us / 1000 / self.width_ms * self.width_ms;
        self.slices
            .entry(at)
            .or_insert_with(|| Latency::with_figures(2))
            .record(micros);
    }

    pub fn merge(&mut self, other: &Timeline) {
        self.width_ms = self.width_ms.max(other.width_ms);
        for (at, latency) in &other.slices {
            self.slices
                .entry(*at)
                .or_insert_with(|| Latency::with_figures(2))
                .merge(latency);
        }
    }

    /// Every slice in time order, placed relative to `zero_us` (Unix micros).
    pub fn slices(&self, zero_us: u64) -> Vec<Slice> {
        let zero_ms = (zero_us / 1000) as i64;
        self.slices
            .iter()
            .map(|(at, latency)| Slice {
                at_ms: *at as i64 - zero_ms,
                latency_us: latency.quantiles(),
            })
            .collect()
    }
}

#[derive(Serialize, Deserialize)]
struct TimelineWire {
    width_ms: u64,
    slices: Vec<(u64, Vec<(u64, u64)>)>,
}

impl Serialize for Timeline {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        TimelineWire {
            width_ms: self.width_ms,
            slices: self.slices.iter().map(|(at, l)| (*at, l.pairs())).collect(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Timeline {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = TimelineWire::deserialize(d)?;
        let slices = wire
            .slices
            .into_iter()
            .map(|(at, pairs)| (at, Latency::with_figures(2).with_pairs(pairs)))
            .collect();
        Ok(Self {
            width_ms: wire.width_ms,
            slices,
        })
    }
}

/// Microseconds since the Unix epoch: comparable across the bench's processes on one machine.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_the_trip_between_processes() {
        let mut a = Latency::default();
        for v in 1..=1000 {
            a.record(v);
        }
        let json = serde_json::to_string(&a).unwrap();
        let b: Latency = serde_json::from_str(&json).unwrap();
        assert_eq!(a.quantiles(), b.quantiles());
        let mut c = Latency::default();
        c.merge(&a);
        c.merge(&b);
        assert_eq!(c.quantiles().count, 2000);
        assert!((495..=505).contains(&c.quantiles().p50));
    }

    #[test]
    fn a_timeline_places_each_latency_in_the_slice_it_was_sent_in() {
        let zero_us = 1_700_000_000_000_000;
        let mut a = Timeline::new(100);
        a.record(zero_us + 5_000, 1_000);
        a.record(zero_us + 99_000, 3_000);
        a.record(zero_us + 250_000, 40_000);
        let json = serde_json::to_string(&a).unwrap();
        let mut b: Timeline = serde_json::from_str(&json).unwrap();
        b.merge(&a);
        let slices = b.slices(zero_us);
        let at: Vec<i64> = slices.iter().map(|s| s.at_ms).collect();
        assert_eq!(at, [0, 200]);
        assert_eq!(slices[0].latency_us.count, 4);
        assert!((2_970..=3_030).contains(&slices[0].latency_us.max));
        assert_eq!(slices[1].latency_us.count, 2);
        assert!((39_600..=40_400).contains(&slices[1].latency_us.p50));
    }

    #[test]
    fn a_timeline_of_width_zero_records_nothing() {
        let mut off = Timeline::default();
        off.record(unix_micros(), 1_000);
        assert!(off.slices(0).is_empty());
    }
}
