//! The event log's contract, written once and run against every backend:
//! sled and the in-memory store (`tests/backends.rs`, through the sync
//! `EventStore` trait) and PostgreSQL (`tests/pg_log.rs`, through
//! `PgLog`'s async methods) — so the database log is held to the same
//! promises the engine relies on, not to a copy of them.
#![allow(dead_code, async_fn_in_trait)]

use chrono::{DateTime, Duration as Span, TimeZone, Utc};
use easel::domain::{ChatId, Event, ModelName, Origin, Prompt, RequestId, UserId};
use easel::store::pg::{Appended, Follow, PgLog};
use easel::store::{EventStore, NewEvent, Recorded};
use tokio::sync::watch;

/// What the contract asks of a log; a failure of the backend fails the test.
pub trait Log {
    fn last_seq(&self) -> u64;
    fn subscribe(&self) -> watch::Receiver<u64>;
    async fn append(&self, events: Vec<NewEvent>) -> Vec<Recorded>;
    async fn durable(&self, seq: u64);
    async fn read_from(&self, seq: u64) -> Vec<u64>;
    /// The names of one request's events, oldest first.
    async fn events_of(&self, id: RequestId) -> Vec<&'static str>;
    async fn find_update(&self, update_id: u32) -> Option<RequestId>;
    async fn find_message(&self, chat: ChatId, message_id: i32) -> Option<RequestId>;
    async fn request_ids(
        &self,
        user: Option<UserId>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        newest_first: bool,
    ) -> Vec<RequestId>;
    async fn ids_between(&self, lo: RequestId, hi: RequestId) -> Vec<RequestId>;
    async fn save_checkpoint(&self, seq: u64, state: &[u8]);
    async fn load_checkpoint(&self) -> Option<(u64, Vec<u8>)>;
    async fn put_meta(&self, name: &str, value: &[u8]);
    async fn get_meta(&self, name: &str) -> Option<Vec<u8>>;
    /// The names under `prefix`, in order.
    async fn scan_meta(&self, prefix: &str) -> Vec<String>;
    async fn delete_meta(&self, name: &str);
    async fn forget_requests(&self, ids: &[RequestId], name: &str, value: &[u8]) -> usize;
}

/// An embedded `EventStore` (sled, memory) seen through the contract.
pub struct Embedded<'a, S>(pub &'a S);

impl<S: EventStore> Log for Embedded<'_, S> {
    fn last_seq(&self) -> u64 {
        self.0.last_seq()
    }
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
    async fn append(&self, events: Vec<NewEvent>) -> Vec<Recorded> {
        self.0.append(events).unwrap()
    }
    async fn durable(&self, seq: u64) {
        self.0.wait_durable(seq).await.unwrap();
    }
    async fn read_from(&self, seq: u64) -> Vec<u64> {
        self.0.read_from(seq).map(|r| r.unwrap().seq).collect()
    }
    async fn events_of(&self, id: RequestId) -> Vec<&'static str> {
        let events = self.0.events_of(id).unwrap();
        events
            .iter()
            .map(|r| r.as_ref().unwrap().event.name())
            .collect()
    }
    async fn find_update(&self, update_id: u32) -> Option<RequestId> {
        self.0.find_update(update_id).unwrap()
    }
    async fn find_message(&self, chat: ChatId, message_id: i32) -> Option<RequestId> {
        self.0.find_message(chat, message_id).unwrap()
    }
    async fn request_ids(
        &self,
        user: Option<UserId>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        newest_first: bool,
    ) -> Vec<RequestId> {
        let ids = self.0.request_ids(user, since, until, newest_first);
        ids.map(Result::unwrap).collect()
    }
    async fn ids_between(&self, lo: RequestId, hi: RequestId) -> Vec<RequestId> {
        self.0.ids_between(lo, hi).map(Result::unwrap).collect()
    }
    async fn save_checkpoint(&self, seq: u64, state: &[u8]) {
        self.0.save_checkpoint(seq, state).unwrap();
    }
    async fn load_checkpoint(&self) -> Option<(u64, Vec<u8>)> {
        self.0.load_checkpoint().unwrap()
    }
    async fn put_meta(&self, name: &str, value: &[u8]) {
        self.0.put_meta(name, value).unwrap();
    }
    async fn get_meta(&self, name: &str) -> Option<Vec<u8>> {
        self.0.get_meta(name).unwrap()
    }
    async fn scan_meta(&self, prefix: &str) -> Vec<String> {
        let found = self.0.scan_meta(prefix).unwrap();
        found.into_iter().map(|(k, _)| k).collect()
    }
    async fn delete_meta(&self, name: &str) {
        self.0.delete_meta(name).unwrap();
    }
    async fn forget_requests(&self, ids: &[RequestId], name: &str, value: &[u8]) -> usize {
        self.0.forget_requests(ids, name, value).unwrap()
    }
}

/// The PostgreSQL log: commits are durable when they return.
impl<F: Follow> Log for PgLog<F> {
    fn last_seq(&self) -> u64 {
        self.last_position()
    }
    fn subscribe(&self) -> watch::Receiver<u64> {
        PgLog::subscribe(self)
    }
    async fn append(&self, events: Vec<NewEvent>) -> Vec<Recorded> {
        match PgLog::append(self, events).await.unwrap() {
            Appended::Written(recs) => recs,
            other => panic!("not written: {other:?}"),
        }
    }
    async fn durable(&self, seq: u64) {
        assert!(self.last_position() >= seq, "{seq} not committed");
    }
    async fn read_from(&self, seq: u64) -> Vec<u64> {
        let page = PgLog::read_from(self, seq, u32::MAX).await.unwrap();
        page.into_iter().map(|r| r.unwrap().seq).collect()
    }
    async fn events_of(&self, id: RequestId) -> Vec<&'static str> {
        let events = PgLog::events_of(self, id).await.unwrap();
        events
            .iter()
            .map(|r| r.as_ref().unwrap().event.name())
            .collect()
    }
    async fn find_update(&self, update_id: u32) -> Option<RequestId> {
        PgLog::find_update(self, update_id).await.unwrap()
    }
    async fn find_message(&self, chat: ChatId, message_id: i32) -> Option<RequestId> {
        PgLog::find_message(self, chat, message_id).await.unwrap()
    }
    async fn request_ids(
        &self,
        user: Option<UserId>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        newest_first: bool,
    ) -> Vec<RequestId> {
        let ids = PgLog::request_ids(self, user, since, until, newest_first);
        ids.await.unwrap()
    }
    async fn ids_between(&self, lo: RequestId, hi: RequestId) -> Vec<RequestId> {
        PgLog::ids_between(self, lo, hi).await.unwrap()
    }
    async fn save_checkpoint(&self, seq: u64, state: &[u8]) {
        PgLog::save_checkpoint(self, seq, state).await.unwrap();
    }
    async fn load_checkpoint(&self) -> Option<(u64, Vec<u8>)> {
        PgLog::load_checkpoint(self).await.unwrap()
    }
    async fn put_meta(&self, name: &str, value: &[u8]) {
        PgLog::put_meta(self, name, value).await.unwrap();
    }
    async fn get_meta(&self, name: &str) -> Option<Vec<u8>> {
        PgLog::get_meta(self, name).await.unwrap()
    }
    async fn scan_meta(&self, prefix: &str) -> Vec<String> {
        let found = PgLog::scan_meta(self, prefix).await.unwrap();
        found.into_iter().map(|(k, _)| k).collect()
    }
    async fn delete_meta(&self, name: &str) {
        PgLog::delete_meta(self, name).await.unwrap();
    }
    async fn forget_requests(&self, ids: &[RequestId], name: &str, value: &[u8]) -> usize {
        PgLog::forget_requests(self, ids, name, value)
            .await
            .unwrap()
    }
}

pub fn queued(user: i64, update: u32, message: i32, at_min: i64) -> NewEvent {
    let at = Utc
        .with_ymd_and_hms(2026, 11, 25, 10, 0, 0)
        .single()
        .unwrap()
        + Span::minutes(at_min);
    NewEvent {
        request_id: RequestId::random(),
        at,
        event: Event::Queued {
            model: ModelName::parse("flux").unwrap(),
            prompt: Prompt::parse("a fox").unwrap(),
            origin: Origin {
                user_id: UserId(user),
                chat_id: ChatId(user),
                message_id: Some(message),
                update_id: Some(update),
                language: None,
            },
            preset: None,
            remembered: false,
            input: None,
            images: 1,
        },
    }
}

fn started(id: RequestId, at: DateTime<Utc>) -> NewEvent {
    NewEvent {
        request_id: id,
        at,
        event: Event::Started,
    }
}

/// The log's promises, method by method.
pub async fn conforms(store: &impl Log) {
    assert_eq!(store.last_seq(), 0);
    let mut woken = store.subscribe();
    // Seqs are contiguous from 1, in call order.
    let a = store.append(vec![queued(1, 10, 100, 0)]).await;
    let b = store
        .append(vec![queued(2, 11, 200, 1), queued(1, 12, 101, 2)])
        .await;
    assert_eq!(
        [a[0].seq, b[0].seq, b[1].seq],
        [1, 2, 3],
        "contiguous seqs in call order"
    );
    assert!(woken.has_changed().unwrap(), "subscribers are woken");
    assert_eq!(*woken.borrow_and_update(), 3);
    let (ra, rb, rc) = (a[0].request_id, b[0].request_id, b[1].request_id);
    let more = store.append(vec![started(ra, a[0].at)]).await;
    assert_eq!(more[0].seq, 4);
    store.durable(4).await;

    // Reads.
    assert_eq!(store.read_from(1).await, [1, 2, 3, 4]);
    assert_eq!(store.read_from(3).await, [3, 4]);
    assert_eq!(store.events_of(ra).await, ["queued", "started"]);
    assert!(
        store
            .events_of(RequestId(uuid::Uuid::nil()))
            .await
            .is_empty()
    );

    // Intake keys.
    assert_eq!(store.find_update(11).await, Some(rb));
    assert_eq!(store.find_update(99).await, None);
    assert_eq!(store.find_message(ChatId(1), 101).await, Some(rc));
    assert_eq!(store.find_message(ChatId(2), 101).await, None);

    // The request index: creation order, per user, bounded.
    assert_eq!(
        store.request_ids(None, None, None, false).await,
        [ra, rb, rc]
    );
    assert_eq!(
        store.request_ids(None, None, None, true).await,
        [rc, rb, ra]
    );
    assert_eq!(
        store.request_ids(Some(UserId(1)), None, None, false).await,
        [ra, rc]
    );
    // Bounded by creation time (ids are random: their order is not time).
    let tb = b[0].at;
    assert_eq!(
        store.request_ids(None, Some(tb), None, false).await,
        [rb, rc]
    );
    assert_eq!(
        store.request_ids(None, None, Some(tb), false).await,
        [ra, rb]
    );
    // By id, for prefix lookups: every id between the bounds, in id order.
    let mut sorted = vec![ra, rb, rc];
    sorted.sort();
    let (lo, hi) = (RequestId(uuid::Uuid::nil()), RequestId(uuid::Uuid::max()));
    assert_eq!(store.ids_between(lo, hi).await, sorted);
    assert_eq!(store.ids_between(rb, rb).await, [rb]);

    // Checkpoints and small values.
    assert_eq!(store.load_checkpoint().await, None);
    store.save_checkpoint(4, b"state").await;
    assert_eq!(store.load_checkpoint().await, Some((4, b"state".to_vec())));
    store.put_meta("status/1", b"a").await;
    store.put_meta("status/2", b"b").await;
    store.put_meta("status_", b"c").await;
    store.put_meta("offset", b"7").await;
    assert_eq!(store.get_meta("offset").await, Some(b"7".to_vec()));
    // A prefix is a prefix, not a pattern (`_` is a wildcard in SQL's LIKE).
    assert_eq!(store.scan_meta("status/").await, ["status/1", "status/2"]);
    store.delete_meta("status/1").await;
    store.delete_meta("absent").await;
    assert_eq!(store.get_meta("status/1").await, None);

    // Retention: whole requests go with every key; seqs stay taken.
    assert_eq!(store.forget_requests(&[ra], "archive/next", b"1").await, 2);
    assert!(store.events_of(ra).await.is_empty());
    assert_eq!(store.find_update(10).await, None);
    assert_eq!(store.find_message(ChatId(1), 100).await, None);
    assert_eq!(
        store.request_ids(Some(UserId(1)), None, None, false).await,
        [rc]
    );
    assert_eq!(store.get_meta("archive/next").await, Some(b"1".to_vec()));
    let next = store.append(vec![queued(3, 13, 300, 3)]).await;
    assert_eq!(
        next[0].seq, 5,
        "a removed request's seqs are never given again"
    );
    assert_eq!(store.last_seq(), 5);
    assert_eq!(store.read_from(1).await, [2, 3, 5]);
}
