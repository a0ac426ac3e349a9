//! An event log in memory: the second implementation of [`EventStore`],
//! for fast tests of everything above the store (the engine, the runners,
//! intake) and as the reference a new backend is checked against (the
//! same tests run on both). Nothing survives the process: `wait_durable`
//! returns at once. Never the bot's log; besides the tests it holds a
//! PostgreSQL log's records for the operator commands (`MemoryStore::load`),
//! which then query it as they query sled.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::{EventStore, NewEvent, ReadItem, Recorded, StoreError};
use crate::domain::{ChatId, Event, RequestId, UserId};

#[derive(Default)]
struct Log {
    events: BTreeMap<u64, Recorded>,
    /// Every seq handed out so far (removals never give one back).
    high_water: u64,
    by_request: HashMap<RequestId, Vec<u64>>,
    /// Requests in creation order (milliseconds, then id), and per user.
    requests: BTreeSet<(i64, RequestId)>,
    by_user: HashMap<UserId, BTreeSet<(i64, RequestId)>>,
    /// Every request id, in id order (prefix lookups).
    ids: BTreeSet<RequestId>,
    updates: HashMap<u32, RequestId>,
    messages: HashMap<(ChatId, i32), RequestId>,
    checkpoint: Option<(u64, Vec<u8>)>,
    meta: BTreeMap<String, Vec<u8>>,
}

/// See the module doc.
pub struct MemoryStore {
    log: Mutex<Log>,
    last: watch::Sender<u64>,
    flushes: AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            log: Mutex::new(Log::default()),
            last: watch::channel(0).0,
            flushes: AtomicU64::new(0),
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `records` at their own seqs (oldest first; a seq
    /// not above the one before is skipped), with every index derived as
    /// an append derives it.
    pub fn load(records: impl IntoIterator<Item = Recorded>) -> Self {
        let store = Self::default();
        for rec in records {
            store.insert(rec);
        }
        store
    }

    /// Adds `rec` at its own seq, with every index derived as an append
    /// derives it (a replica's copy of the database log follows it this
    /// way). False, and nothing added, when the seq is not above the last.
    pub fn insert(&self, rec: Recorded) -> bool {
        {
            let mut log = self.lock();
            if rec.seq <= log.high_water {
                return false;
            }
            log.high_water = rec.seq - 1;
        }
        self.append(vec![NewEvent {
            request_id: rec.request_id,
            at: rec.at,
            event: rec.event,
        }])
        .is_ok()
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl EventStore for MemoryStore {
    fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Recorded>, StoreError> {
        let mut log = self.lock();
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            log.high_water += 1;
            let rec = Recorded {
                seq: log.high_water,
                request_id: e.request_id,
                at: e.at,
                event: e.event,
            };
            let id = rec.request_id;
            log.by_request.entry(id).or_default().push(rec.seq);
            if let Event::Queued { origin, .. } = &rec.event {
                let at = rec.at.timestamp_millis();
                log.requests.insert((at, id));
                log.by_user
                    .entry(origin.user_id)
                    .or_default()
                    .insert((at, id));
                log.ids.insert(id);
                if let Some(u) = origin.update_id {
                    log.updates.insert(u, id);
                }
                if let Some(m) = origin.message_id {
                    log.messages.insert((origin.chat_id, m), id);
                }
            }
            log.events.insert(rec.seq, rec.clone());
            out.push(rec);
        }
        let last = log.high_water;
        drop(log);
        self.last.send_replace(last);
        Ok(out)
    }

    async fn wait_durable(&self, _seq: u64) -> Result<(), StoreError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn read_from(&self, seq: u64) -> Box<dyn Iterator<Item = ReadItem> + Send + '_> {
        let snapshot: Vec<ReadItem> = self
            .lock()
            .events
            .range(seq..)
            .map(|(_, r)| Ok(r.clone()))
            .collect();
        Box::new(snapshot.into_iter())
    }

    fn events_of(&self, id: RequestId) -> Result<Vec<ReadItem>, StoreError> {
        let log = self.lock();
        Ok(log
            .by_request
            .get(&id)
            .into_iter()
            .flatten()
            .filter_map(|seq| log.events.get(seq))
            .map(|r| Ok(r.clone()))
            .collect())
    }

    fn find_update(&self, update_id: u32) -> Result<Option<RequestId>, StoreError> {
        Ok(self.lock().updates.get(&update_id).copied())
    }

    fn find_message(&self, chat: ChatId, message_id: i32) -> Result<Option<RequestId>, StoreError> {
        Ok(self.lock().messages.get(&(chat, message_id)).copied())
    }

    fn last_seq(&self) -> u64 {
        self.lock().high_water
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.last.subscribe()
    }

    fn save_checkpoint(&self, seq: u64, state: &[u8]) -> Result<(), StoreError> {
        self.lock().checkpoint = Some((seq, state.to_vec()));
        Ok(())
    }

    fn load_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self.lock().checkpoint.clone())
    }

    fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.lock().meta.insert(name.to_owned(), value.to_vec());
        Ok(())
    }

    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().meta.get(name).cloned())
    }

    fn request_ids(
        &self,
        user: Option<UserId>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        newest_first: bool,
    ) -> Box<dyn Iterator<Item = Result<RequestId, StoreError>> + Send + '_> {
        let log = self.lock();
        let empty = BTreeSet::new();
        let set = match user {
            Some(u) => log.by_user.get(&u).unwrap_or(&empty),
            None => &log.requests,
        };
        let (lo, hi) = (
            since.map_or(i64::MIN, |t| t.timestamp_millis()),
            until.map_or(i64::MAX, |t| t.timestamp_millis()),
        );
        let mut ids: Vec<RequestId> = set
            .iter()
            .filter(|(at, _)| (lo..=hi).contains(at))
            .map(|(_, id)| *id)
            .collect();
        if newest_first {
            ids.reverse();
        }
        Box::new(ids.into_iter().map(Ok))
    }

    fn ids_between(
        &self,
        lo: RequestId,
        hi: RequestId,
    ) -> Box<dyn Iterator<Item = Result<RequestId, StoreError>> + Send + '_> {
        let ids: Vec<RequestId> = self.lock().ids.range(lo..=hi).copied().collect();
        Box::new(ids.into_iter().map(Ok))
    }

    fn scan_meta(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .lock()
            .meta
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn delete_meta(&self, name: &str) -> Result<(), StoreError> {
        self.lock().meta.remove(name);
        Ok(())
    }

    fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn forget_requests(
        &self,
        ids: &[RequestId],
        name: &str,
        value: &[u8],
    ) -> Result<usize, StoreError> {
        let mut log = self.lock();
        let mut removed = 0;
        for id in ids {
            for seq in log.by_request.remove(id).unwrap_or_default() {
                let Some(rec) = log.events.remove(&seq) else {
                    continue;
                };
                removed += 1;
                if let Event::Queued { origin, .. } = &rec.event {
                    let at = rec.at.timestamp_millis();
                    log.requests.remove(&(at, *id));
                    if let Some(set) = log.by_user.get_mut(&origin.user_id) {
                        set.remove(&(at, *id));
                    }
                    log.ids.remove(id);
                    // Intake keys only while they still name this request.
                    if let Some(u) = origin.update_id
                        && log.updates.get(&u) == Some(id)
                    {
                        log.updates.remove(&u);
                    }
                    if let Some(m) = origin.message_id
                        && log.messages.get(&(origin.chat_id, m)) == Some(id)
                    {
                        log.messages.remove(&(origin.chat_id, m));
                    }
                }
            }
        }
        log.meta.insert(name.to_owned(), value.to_vec());
        Ok(removed)
    }
}
