//! The dashboard's pages (maud: checked at compile time, every
//! interpolated string escaped), its script and style, and the charts
//! drawn as inline SVG from the requests of the last hours.

use chrono::{DateTime, Duration, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::{LaneView, WINDOW_HOURS, waited};
use crate::projection::RequestRecord;
use crate::store::Recorded;

/// The page's only script: live updates of the queue panel. Everything
/// else works with JavaScript off.
pub const SCRIPT: &str = r#""use strict";
(function () {
  var panel = document.getElementById("lanes");
  if (!panel || !window.EventSource) { return; }
  var live = new EventSource("/live");
  live.addEventListener("lanes", function (e) {
    panel.innerHTML = e.data;
    panel.setAttribute("data-updated", String(Date.now()));
  });
})();
"#;

pub const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;background:#fafafa}\
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem}\
table{border-collapse:collapse;font-size:.9rem}td,th{padding:.25rem .6rem;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}\
.lanes{display:flex;gap:1rem;flex-wrap:wrap}.lane{background:#fff;border:1px solid #ccc;border-radius:6px;padding:.6rem 1rem;min-width:14rem}\
.idle{color:#777}.failed{color:#a00}.done{color:#070}.cancelled{color:#777}.prompt{max-width:28rem;overflow-wrap:anywhere}\
code{font-size:.85rem}svg{background:#fff;border:1px solid #ccc}.legend span{margin-right:1rem}";

fn shell(title: &str, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                link rel="stylesheet" href="/dashboard.css";
            }
            body { (body) }
        }
    }
    .into_string()
}

/// The token form (`401`).
pub fn login(wrong: bool) -> String {
    shell(
        "easel — sign in",
        html! {
            h1 { "easel dashboard" }
            @if wrong { p.failed { "That token is not the dashboard's." } }
            p { "Enter the dashboard token (EASEL_DASHBOARD_TOKEN)." }
            form method="post" action="/login" {
                input type="password" name="token" autocomplete="current-password" required;
                " "
                button type="submit" { "Open" }
            }
        },
    )
}

pub fn starting() -> String {
    shell(
        "easel — starting",
        html! { h1 { "easel dashboard" } p { "The bot is starting; reload in a moment." } },
    )
}

pub fn not_found(prefix: &str) -> String {
    shell(
        "easel — no such request",
        html! {
            h1 { "No such request" }
            p { "No single request's id starts with " code { (prefix) } "." }
            p { a href="/" { "Back" } }
        },
    )
}

/// "3 s", "2 min", "1 h 5 min".
fn ago(from: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - from).num_seconds().max(0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// The queue panel: pushed as it is by the live stream.
pub fn lanes_panel(now: DateTime<Utc>, lanes: &[LaneView]) -> String {
    html! {
        @for l in lanes {
            div.lane data-model=(l.model) {
                strong { (l.model) }
                br;
                @match &l.in_flight {
                    Some((id, stage, since)) => {
                        "running " code { (id) } " — " (stage.as_str()) " for " (ago(*since, now))
                    }
                    None => span.idle { "idle" },
                }
                br;
                span.queued { "queued: " (l.queued) }
                @if let Some(oldest) = l.oldest {
                    " (oldest waiting " (ago(oldest, now)) ")"
                }
            }
        }
    }
    .into_string()
}

fn stage_times(r: &RequestRecord) -> String {
    r.stage_ms
        .iter()
        .map(|(k, ms)| format!("{k} {:.1} s", *ms as f64 / 1000.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The main page: lanes, recent requests, charts.
pub fn index(
    now: DateTime<Utc>,
    lanes: &[LaneView],
    window: &[RequestRecord],
    recent: usize,
) -> String {
    let charts = charts(now, lanes, window);
    shell(
        "easel dashboard",
        html! {
            h1 { "easel dashboard" }
            p.idle { "As of " (now.format("%Y-%m-%d %H:%M:%S UTC")) "; the queues update live." }
            h2 { "Queues" }
            div #lanes .lanes { (PreEscaped(lanes_panel(now, lanes))) }
            h2 { "Recent requests" }
            table #recent {
                tr { th { "id" } th { "user" } th { "model" } th { "state" } th { "created" } th { "stage times" } th { "prompt" } th { "failure" } }
                @for r in window.iter().take(recent) {
                    tr data-state=(r.status.as_str()) {
                        td { a href={ "/requests/" (r.id.short()) } { code { (r.id.short()) } } }
                        td { (r.user_id.0) }
                        td { (r.model.as_str()) }
                        td class=(r.status.as_str()) { (r.status.as_str()) }
                        td { (r.created_at.format("%H:%M:%S")) }
                        td { (stage_times(r)) }
                        td.prompt { (r.prompt) }
                        td.failed { (r.error.as_deref().unwrap_or("")) }
                    }
                }
            }
            @if window.is_empty() { p.idle { "No requests in the last " (WINDOW_HOURS) " hours." } }
            (PreEscaped(charts))
            script src="/dashboard.js" {}
        },
    )
}

/// One request's timeline: the same facts as `easel audit show`.
pub fn timeline(r: &RequestRecord, events: &[Recorded]) -> String {
    shell(
        "easel — request",
        html! {
            p { a href="/" { "← dashboard" } }
            h1 { "Request " code { (r.id.to_string()) } }
            table {
                tr { th { "user" } td { (r.user_id.0) " (chat " (r.chat_id.0) ")" } }
                tr { th { "model" } td { (r.model.as_str()) } }
                tr { th { "state" } td class=(r.status.as_str()) { (r.status.as_str()) } }
                tr { th { "prompt" } td.prompt { (r.prompt) } }
                @if let Some(p) = &r.enhanced_prompt { tr { th { "improved" } td.prompt { (p) } } }
                tr { th { "created" } td { (r.created_at.format("%Y-%m-%d %H:%M:%S%.3f UTC")) } }
                tr { th { "stage times" } td { (stage_times(r)) } }
                tr { th { "attempts" } td { (r.attempts) } }
                @if let Some(e) = &r.error { tr { th { "failure" } td.failed { (e) } } }
            }
            h2 { "Events" }
            table #events {
                tr { th { "seq" } th { "at" } th { "event" } th { "details" } }
                @for e in events {
                    tr {
                        td { (e.seq) }
                        td { (e.at.format("%H:%M:%S%.3f")) }
                        td { (e.event.name()) }
                        td.prompt { code { (serde_json::to_string(&crate::ops::json::ExportedEvent::from(e)).unwrap_or_default()) } }
                    }
                }
            }
        },
    )
}

/// Width and height of a chart's plot area, and its margin.
const W: f64 = 560.0;
const H: f64 = 160.0;
const M: f64 = 36.0;

const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

/// An SVG line chart: each series a polyline over `0..=n` steps.
fn line_chart(
    id: &str,
    title: &str,
    unit: &str,
    steps: usize,
    series: &[(String, Vec<f64>)],
) -> Markup {
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let x = |i: usize| M + W * i as f64 / steps.max(1) as f64;
    let y = |v: f64| M + H - H * v / top;
    html! {
        h2 { (title) }
        svg id=(id) role="img" width=(W + 2.0 * M) height=(H + 2.0 * M) viewBox={ "0 0 " (W + 2.0 * M) " " (H + 2.0 * M) } {
            title { (title) }
            line x1=(M) y1=(M + H) x2=(M + W) y2=(M + H) stroke="#888" {}
            line x1=(M) y1=(M) x2=(M) y2=(M + H) stroke="#888" {}
            text x="2" y=(M + 4.0) font-size="11" { (format!("{top:.0}")) }
            text x="2" y=(M + H) font-size="11" { "0" }
            text x=(M) y=(M + H + 16.0) font-size="11" { "-" (WINDOW_HOURS) " h" }
            text x=(M + W - 20.0) y=(M + H + 16.0) font-size="11" { "now" }
            text x=(M + W - 40.0) y=(M - 8.0) font-size="11" { (unit) }
            @for (i, (name, values)) in series.iter().enumerate() {
                polyline fill="none" stroke=(COLOURS[i % COLOURS.len()]) stroke-width="2"
                    points=(values.iter().enumerate().map(|(k, v)| format!("{:.1},{:.1}", x(k), y(*v))).collect::<Vec<_>>().join(" ")) {
                    title { (name) }
                }
            }
        }
        p.legend {
            @for (i, (name, _)) in series.iter().enumerate() {
                span { svg width="12" height="12" { rect width="12" height="12" fill=(COLOURS[i % COLOURS.len()]) {} } " " (name) }
            }
        }
    }
}

/// The `q` quantile of `values` (nearest rank), 0 when empty.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// Queue depth per model every 15 minutes, and p50/p95 of each stage's
/// time per hour, over the last [`WINDOW_HOURS`].
fn charts(now: DateTime<Utc>, lanes: &[LaneView], window: &[RequestRecord]) -> String {
    let start = now - Duration::hours(WINDOW_HOURS);
    let steps = (WINDOW_HOURS * 4) as usize;
    let at = |i: usize| start + Duration::minutes(15 * i as i64);
    let depth: Vec<(String, Vec<f64>)> = lanes
        .iter()
        .map(|l| {
            let values = (0..=steps)
                .map(|i| {
                    let t = at(i);
                    window
                        .iter()
                        .filter(|r| r.model.as_str() == l.model)
                        .filter(|r| {
                            let (from, to) = waited(r, now);
                            from <= t && t < to
                        })
                        .count() as f64
                })
                .collect();
            (l.model.clone(), values)
        })
        .collect();
    let hours = WINDOW_HOURS as usize;
    let mut latency = Vec::new();
    for stage in ["queue_wait", "enhancing", "generating", "sending"] {
        for (q, label) in [(0.5, "p50"), (0.95, "p95")] {
            let values = (0..=hours)
                .map(|h| {
                    let from = start + Duration::hours(h as i64) - Duration::minutes(30);
                    let to = from + Duration::hours(1);
                    let mut v: Vec<f64> = window
                        .iter()
                        .filter(|r| r.created_at >= from && r.created_at < to)
                        .flat_map(|r| r.stage_ms.iter().filter(|(k, _)| *k == stage))
                        .map(|(_, ms)| *ms as f64 / 1000.0)
                        .collect();
                    quantile(&mut v, q)
                })
                .collect();
            latency.push((format!("{stage} {label}"), values));
        }
    }
    let mut out = line_chart(
        "depth",
        "Queue depth (every 15 min)",
        "requests",
        steps,
        &depth,
    )
    .into_string();
    out.push_str(
        &line_chart(
            "latency",
            "Stage time p50 / p95 (by hour)",
            "seconds",
            hours,
            &latency,
        )
        .into_string(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(&mut v, 0.5), 3.0);
        assert_eq!(quantile(&mut v, 0.95), 5.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }
}
