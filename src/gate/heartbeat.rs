//! Team heartbeats: when a team's client (the browser extension) last checked in.
//!
//! One atomic per team, shared by every cache entry of that team and kept outside config
//! snapshots. Recording marks the registry dirty; a flusher outside the gate persists dirty
//! values in batches. A heartbeat "from the future" (the wall clock stepped back) is pulled back
//! to now when seen, so it ages out one window later instead of staying fresh for the size of the
//! step.
//!
//! A beat, once made, is kept for the life of the process, as the map this replaces kept it: the
//! records and their team ids live in leaked slabs, as the key usage records do, so a team entry
//! holds a plain `&'static` reference and the registry's table one pointer a team. The map
//! (`Arc<str>` to `Arc<Beat>`) cost about 140 heap bytes a team, this about 55 (`tests/memory.rs`,
//! its heartbeats).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use hashbrown::HashTable;

use super::keys::{Slab, Text};
use crate::clock::UnixMillis;

/// "Never seen".
pub const NEVER: UnixMillis = i64::MIN;

/// One team's last heartbeat.
#[derive(Debug)]
pub struct Beat {
    /// The team's id, in the registry's process-lifetime text.
    team: &'static str,
    last_ms: AtomicI64,
    /// Whether the team must keep its heartbeat fresh (for the stale-teams metric).
    required: AtomicBool,
}

impl Beat {
    /// A record not in use, filling a slab's free places.
    fn blank() -> Beat {
        Beat {
            team: "",
            last_ms: AtomicI64::new(NEVER),
            required: AtomicBool::new(false),
        }
    }

    pub fn last(&self) -> UnixMillis {
        self.last_ms.load(Ordering::Acquire)
    }

    /// Whether the heartbeat is within `window_ms` of `now`.
    pub fn fresh(&self, now: UnixMillis, window_ms: i64) -> bool {
        let last = self.last();
        if last == NEVER {
            return false;
        }
        if last > now {
            // The wall clock went back: count the beat as made now, once.
            let _ = self
                .last_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire);
            return true;
        }
        now - last <= window_ms
    }
}

/// All teams' heartbeats.
#[derive(Debug, Default)]
pub struct Heartbeats {
    beats: Mutex<Beats>,
    dirty: AtomicBool,
}

#[derive(Debug, Default)]
struct Beats {
    by_team: HashTable<&'static Beat>,
    hasher: ahash::RandomState,
    records: Slab<Beat>,
    text: Text,
}

impl Beats {
    fn get(&self, team: &str) -> Option<&'static Beat> {
        let h = self.hasher.hash_one(team);
        self.by_team.find(h, |b| b.team == team).copied()
    }

    /// The beat of a team, made ("never", not required) on first use.
    fn get_or_make(&mut self, team: &str) -> &'static Beat {
        if let Some(b) = self.get(team) {
            return b;
        }
        let team = self.text.copy_str(team);
        let beat = self.records.put(
            Beat {
                team,
                ..Beat::blank()
            },
            Beat::blank,
        );
        let Beats {
            by_team, hasher, ..
        } = self;
        by_team.insert_unique(hasher.hash_one(team), beat, |b| hasher.hash_one(b.team));
        beat
    }
}

impl Heartbeats {
    fn lock(&self) -> MutexGuard<'_, Beats> {
        self.beats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The beat of a team, made ("never") on first use.
    pub fn beat(&self, team: &str, required: bool) -> &'static Beat {
        let mut beats = self.lock();
        let beat = beats.get_or_make(team);
        beat.required.store(required, Ordering::Relaxed);
        beat
    }

    /// Records a heartbeat at `now`.
    pub fn record(&self, beat: &Beat, now: UnixMillis) {
        beat.last_ms.store(now, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
    }

    /// Records a heartbeat for a team by id (admin API).
    pub fn record_team(&self, team: &str, now: UnixMillis) {
        let known = self.lock().get(team);
        let beat = known.unwrap_or_else(|| self.beat(team, true));
        self.record(beat, now);
    }

    /// Loads persisted heartbeats (at start), keeping the newer of memory and disk. A team not
    /// known yet is not counted as required until its team record says so ([`Heartbeats::beat`]).
    pub fn restore(&self, saved: impl IntoIterator<Item = (String, UnixMillis)>) {
        let mut beats = self.lock();
        for (team, at) in saved {
            beats
                .get_or_make(&team)
                .last_ms
                .fetch_max(at, Ordering::AcqRel);
        }
    }

    /// If anything was recorded since the last call, every known heartbeat (for persisting).
    pub fn take_dirty(&self) -> Option<Vec<(String, UnixMillis)>> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return None;
        }
        Some(self.all())
    }

    /// Marks the registry dirty again after a failed save, so the next flush retries.
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Every team's last heartbeat, "never" left out.
    pub fn all(&self) -> Vec<(String, UnixMillis)> {
        self.lock()
            .by_team
            .iter()
            .filter(|b| b.last() != NEVER)
            .map(|b| (b.team.to_owned(), b.last()))
            .collect()
    }

    /// The last heartbeat of a team, if any.
    pub fn last(&self, team: &str) -> Option<UnixMillis> {
        let beat = self.lock().get(team);
        beat.map(|b| b.last()).filter(|&t| t != NEVER)
    }

    /// Teams that must send heartbeats and whose last one is older than the window.
    pub fn stale(&self, now: UnixMillis, window_ms: i64) -> usize {
        self.lock()
            .by_team
            .iter()
            .filter(|b| b.required.load(Ordering::Relaxed) && !b.fresh(now, window_ms))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    #[test]
    fn window() {
        let hb = Heartbeats::default();
        let b = hb.beat("t", true);
        assert!(!b.fresh(0, 48 * H), "never seen is stale");
        hb.record(b, 1_000);
        assert!(b.fresh(1_000 + 48 * H, 48 * H));
        assert!(!b.fresh(1_001 + 48 * H, 48 * H));
        assert_eq!(hb.stale(1_001 + 48 * H, 48 * H), 1);
        assert_eq!(hb.stale(1_000, 48 * H), 0);
    }

    #[test]
    fn clock_stepping_back_does_not_keep_a_beat_fresh_forever() {
        let hb = Heartbeats::default();
        let b = hb.beat("t", true);
        hb.record(b, 1_000 * H);
        // The wall clock steps back a week.
        let now = 1_000 * H - 168 * H;
        assert!(b.fresh(now, 48 * H));
        assert!(b.fresh(now + 48 * H, 48 * H));
        assert!(
            !b.fresh(now + 49 * H, 48 * H),
            "ages from when it was seen, not from the future"
        );
    }

    #[test]
    fn dirty_tracking_and_restore() {
        let hb = Heartbeats::default();
        assert!(hb.take_dirty().is_none());
        hb.record_team("a", 5);
        assert_eq!(hb.take_dirty(), Some(vec![("a".to_string(), 5)]));
        assert!(hb.take_dirty().is_none());
        hb.restore([("a".to_string(), 3), ("b".to_string(), 7)]);
        assert_eq!(hb.last("a"), Some(5), "the newer value wins");
        assert_eq!(hb.last("b"), Some(7));
        assert_eq!(hb.last("c"), None);
    }
}
