//! End-to-end latency: an HDR histogram in microseconds that workers ship to the parent as JSON.

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
        Self(
            Histogram::new_with_bounds(1, MAX_MICROS, 3)
                .expect("static histogram bounds are valid"),
        )
    }
}

impl Latency {
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
}

/// On the wire between processes: (value, count) pairs of the recorded buckets.
impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(u64, u64)> = self
            .0
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        pairs.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let pairs = Vec::<(u64, u64)>::deserialize(d)?;
        let mut latency = Latency::default();
        for (value, count) in pairs {
            let _ = latency.0.record_n(value.clamp(1, MAX_MICROS), count);
        }
        Ok(latency)
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
}
