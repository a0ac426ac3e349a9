//! Upkeep of a running bot, apart from serving requests: failing requests
//! of a model no longer configured (at start), and the hourly janitor that
//! deletes expired kept images and moves finished requests past the
//! retention window to the archive, so disk use stays bounded.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::domain::{Command, FailureKind, RequestId};
use crate::engine::{Core, CoreError, ImageStore};
use crate::store::EventStore;

/// How often the janitor runs (it also runs once at start).
pub const JANITOR_EVERY: Duration = Duration::from_secs(3600);

/// Requests left for a model that is no longer configured would wait
/// forever: they fail at start with a clear reason. Returns how many.
///
/// # Errors
/// When a `Failed` cannot be recorded.
pub async fn fail_unconfigured<S: EventStore>(
    core: &Core<S>,
    settings: &Settings,
) -> Result<usize, CoreError> {
    let orphans: Vec<_> = core.read(|s| {
        s.requests()
            .filter(|r| settings.model(&r.model).is_none())
            .map(|r| (r.id, r.model.clone()))
            .collect()
    });
    for (id, model) in &orphans {
        tracing::warn!(request_id = %id, %model, "model no longer configured; failing its request");
        core.execute(
            *id,
            Command::Fail {
                kind: FailureKind::NotConfigured,
                reason: format!("model {model} is not configured any more"),
                attempts: 0,
                statuses: Vec::new(),
            },
        )
        .await?;
    }
    Ok(orphans.len())
}

/// Sweeps at start and then every [`JANITOR_EVERY`] until `shutdown`:
/// expired kept images, and the retention window (the engine's log into
/// its archive: files beside sled's log, the database's archive table).
pub async fn janitor<E: crate::engine::Engine>(
    core: Arc<E>,
    images: Arc<ImageStore>,
    settings: Arc<Settings>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    shutdown: CancellationToken,
) {
    let count = |result: &'static str, archived: usize| {
        if let Some(m) = &metrics {
            m.retention_sweeps
                .get_or_create(&crate::metrics::SweepLabels { result })
                .inc();
            m.retention_archived.inc_by(archived as u64);
        }
    };
    loop {
        match sweep_images(&*core, &images, settings.originals_ttl) {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "expired originals removed"),
            Err(e) => tracing::warn!(error = %e, "could not sweep kept images"),
        }
        let cutoff = settings
            .retention
            .and_then(|w| chrono::Duration::from_std(w).ok())
            .and_then(|w| chrono::Utc::now().checked_sub_signed(w));
        if let Some(cutoff) = cutoff {
            let dir = settings.data_dir.archive();
            let swept = E::sweep_log(&core, cutoff, dir, shutdown.clone()).await;
            match swept {
                Ok(r) if r.requests == 0 => count("ok", 0),
                Ok(r) => {
                    count("ok", r.requests);
                    tracing::info!(
                        requests = r.requests,
                        events = r.events,
                        files = ?r.files,
                        "finished requests past the retention window moved to the archive"
                    );
                }
                Err(e) => {
                    count("error", 0);
                    tracing::warn!(error = %e, "could not archive old requests");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(JANITOR_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Deletes kept images older than `ttl`, never those of an unfinished
/// request (it may still need its image); returns how many went.
///
/// # Errors
/// When the folder cannot be read.
pub fn sweep_images<E: crate::engine::Engine>(
    core: &E,
    images: &ImageStore,
    ttl: Duration,
) -> std::io::Result<usize> {
    let mut removed = 0;
    // Input images (image to image) are named by no request: they are
    // kept while an unfinished request names one.
    let inputs: std::collections::HashSet<String> = core.read(|s| {
        s.requests()
            .filter_map(|r| r.input.as_ref().map(|i| i.file.clone()))
            .collect()
    });
    for entry in std::fs::read_dir(images.dir())? {
        let entry = entry?;
        let path = entry.path();
        let Ok(age) = entry
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default())
        else {
            continue;
        };
        if age < ttl {
            continue;
        }
        // Kept images are named `<request id>.<ext>` (see ImageStore).
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| inputs.contains(n));
        let active = named
            || path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.split('.').next())
                .and_then(|s| s.parse().ok())
                .map(RequestId)
                .is_some_and(|id| core.read(|s| s.request(id).is_some()));
        if !active && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}
