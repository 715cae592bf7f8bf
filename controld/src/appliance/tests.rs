//! The appliance over a temporary region of its own: reloads, admin
//! changes and publication failures, with exact outcomes.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use shm_layout::switch_slot::SW_RUNNING;
use shm_layout::{Mapping, Region, Table};

use super::*;
use crate::admin::proto::ReloadReply;
use crate::config;

/// One small configuration: limits that make a small region, one vnic
/// switch, service "web" with backend web1; `extra` is appended.
fn text(instance: &str, extra: &str) -> String {
    format!(
        r#"
instance = "{instance}"

[limits]
services = 4
backends = 8
connections = 1024
maglev_table_size = 251

[publish]
ack_timeout_ms = 20

[[port]]
name = "client"
driver = "vnic"
mac = "02:00:00:00:00:01"

[[port]]
name = "backend"
driver = "vnic"
mac = "02:00:00:00:00:02"

[[switch]]
name = "sw0"
cpu = 0
ports = ["client", "backend"]

[[service]]
name = "web"
vip = "198.18.0.10"
port = 80
protocol = "tcp"

  [[service.backend]]
  name = "web1"
  address = "198.19.1.1"
  port = 8080
{extra}"#
    )
}

/// An appliance over a temporary region and configuration file, both
/// removed on drop.
struct Fixture {
    app: Appliance,
    instance: String,
    path: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = Mapping::unlink(&shm_layout::region_name(&self.instance));
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Fixture {
    /// Published once (configuration and routing generation 1).
    fn new(tag: &str) -> Self {
        let instance = format!("ap-{tag}-{}", std::process::id());
        let path = std::env::temp_dir().join(format!("controld-{instance}.toml"));
        std::fs::write(&path, text(&instance, "")).unwrap();
        let cfg = config::load(&path).unwrap();
        let region = Region::create(&instance, crate::takeover::capacities(&cfg)).unwrap();
        let mut app = Appliance::new(region, cfg, path.clone());
        assert_eq!(app.publish_initial().unwrap(), (1, 1));
        Fixture {
            app,
            instance,
            path,
        }
    }

    /// Replaces the file with the base configuration plus `extra`.
    fn write(&self, extra: &str) {
        std::fs::write(&self.path, text(&self.instance, extra)).unwrap();
    }

    /// The published configuration's backends, `service/backend` by id.
    fn published(&self) -> Vec<(String, u32)> {
        let cfg = self.app.config();
        let mut v: Vec<(String, u32)> = crate::takeover::published_ids(self.app.region())
            .into_iter()
            .map(|(ident, id)| {
                let name = cfg
                    .services
                    .iter()
                    .flat_map(|s| s.backends.iter().map(move |b| (s, b)))
                    .find(|(s, b)| BackendIdentity::of(s, b) == ident)
                    .map_or("?".to_string(), |(s, b)| format!("{}/{}", s.name, b.name));
                (name, id)
            })
            .collect();
        v.sort();
        v
    }

    /// Makes switch 0 look alive and stalled: it runs (this test process,
    /// which fencing cannot prove to be a switchd and is not our child)
    /// and never acknowledges, so every publication is refused.
    fn stall_switch(&self) {
        self.stall_switch_as(std::process::id());
    }

    /// Switch 0 is process `pid`, running, and acknowledged nothing.
    fn stall_switch_as(&self, pid: u32) {
        let s = &self.app.region().switch_slots()[0];
        s.pid.store(pid, Ordering::Relaxed);
        s.proc_start.store(
            shm_layout::time::process_start(pid).unwrap(),
            Ordering::Relaxed,
        );
        s.seen_config.store(0, Ordering::Release);
        s.state.store(SW_RUNNING, Ordering::SeqCst);
    }

    fn config_words(&self) -> (u32, u64) {
        let w = self.app.region().pub_words(Table::Config);
        (
            w.active.load(Ordering::SeqCst),
            w.generation.load(Ordering::SeqCst),
        )
    }
}

const WEB2: &str = r#"
  [[service.backend]]
  name = "web2"
  address = "198.19.1.2"
  port = 8080
"#;

#[test]
fn an_invalid_file_is_refused_and_the_running_configuration_stays() {
    let mut f = Fixture::new("inv");
    let running = f.app.config().clone();
    let words = f.config_words();
    f.write("  weight = 70000\n");
    let why = config::load(&f.path).unwrap_err().to_string();
    let e = f.app.reload(&f.path.clone()).unwrap_err();
    assert!(matches!(e.cause, Refusal::Invalid(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("reload refused, running configuration (generation 1) kept: {why}")
    );
    assert!(why.ends_with("service \"web\": backend \"web1\": weight 70000 exceeds 65535"));
    assert_eq!(f.config_words(), words);
    assert_eq!(f.app.config(), &running);
    assert_eq!(
        f.published(),
        [("web/web1".to_string(), f.published()[0].1)]
    );
    assert_eq!((f.app.reloads_ok, f.app.reloads_refused), (0, 1));
}

#[test]
fn a_reload_with_an_l7_service_is_refused_until_the_switch_side_exists() {
    let mut f = Fixture::new("l7");
    let running = f.app.config().clone();
    let words = f.config_words();
    std::fs::write(
        &f.path,
        text(&f.instance, "")
            .replace("protocol = \"tcp\"", "protocol = \"tcp\"\nmode = \"l7\"")
            .replace("[publish]", "[l7]\nsource = \"198.18.0.200\"\n\n[publish]"),
    )
    .unwrap();
    // The file itself is valid (what --check says).
    assert_eq!(
        config::load(&f.path).unwrap().services[0].mode,
        config::Mode::L7
    );
    let e = f.app.reload(&f.path.clone()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "reload refused, running configuration (generation 1) kept: service \"web\": mode \"l7\" cannot run yet: the switch side of layer 7 (handshake offload, request buffering, splice) is not built; `controld --check` validates the file"
    );
    assert_eq!(f.config_words(), words);
    assert_eq!(f.app.config(), &running);
    assert_eq!((f.app.reloads_ok, f.app.reloads_refused), (0, 1));
}

#[test]
fn a_reload_that_changes_restart_only_settings_is_refused_naming_them() {
    let mut f = Fixture::new("rst");
    let words = f.config_words();
    let changed = text(&f.instance, WEB2)
        .replace("connections = 1024", "connections = 2048")
        .replace("cpu = 0", "cpu = 1");
    std::fs::write(&f.path, changed).unwrap();
    let e = f.app.reload(&f.path.clone()).unwrap_err();
    assert!(
        matches!(&e.cause, Refusal::RestartOnly(v) if v == &["limits", "switch"]),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "reload refused, running configuration (generation 1) kept: [limits], [switch] changed, which needs a restart"
    );
    assert_eq!(f.config_words(), words);
    assert_eq!(f.app.config().services[0].backends.len(), 1);
}

#[test]
fn a_valid_reload_publishes_a_new_generation_with_the_new_backends() {
    let mut f = Fixture::new("ok");
    let (active, _) = f.config_words();
    let web1 = f.published()[0].1;
    f.write(WEB2);
    let r = f.app.reload(&f.path.clone()).unwrap();
    assert_eq!(
        r,
        ReloadReply {
            generation: 2,
            routing_generation: 2,
            overrides_kept: vec![],
            overrides_dropped: vec![],
            warnings: vec![],
        }
    );
    assert_eq!(f.config_words(), (1 - active, 2));
    let published = f.published();
    assert_eq!(published.len(), 2, "{published:?}");
    assert_eq!(published[0], ("web/web1".to_string(), web1));
    assert_eq!(published[1].0, "web/web2");
    assert_ne!(published[1].1, web1);
    assert_eq!(f.app.config().services[0].backends.len(), 2);
    assert_eq!((f.app.reloads_ok, f.app.reloads_refused), (1, 0));
}

/// A valid file with a warning is published, and the reply (which lbctl
/// prints) carries the warning; before, only `--check` could have said it.
#[test]
fn a_reload_with_warnings_is_published_and_replies_them() {
    let mut f = Fixture::new("warn");
    f.write("  weight = 0\n");
    let r = f.app.reload(&f.path.clone()).unwrap();
    assert_eq!(r.generation, 2);
    assert_eq!(
        r.warnings,
        [
            "service \"web\": every backend has weight 0 (it refuses every new connection; existing ones continue)"
        ]
    );
    assert_eq!(f.app.config().services[0].backends[0].weight, 0);
}

#[test]
fn a_publication_that_fails_keeps_the_running_configuration_and_its_health_checks() {
    let mut f = Fixture::new("pubf");
    let running = f.app.config().clone();
    let words = f.config_words();
    f.write(&format!(
        "{WEB2}    [service.backend.health]\n    kind = \"tcp\"\n"
    ));
    f.stall_switch();
    let e = f.app.reload(&f.path.clone()).unwrap_err();
    assert!(
        matches!(
            e.cause,
            Refusal::Publish(PublishError::Publisher(
                crate::publisher::PublishError::Protocol(_)
            ))
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().starts_with(
            "reload refused, running configuration (generation 1) kept: switch 0 (pid "
        ),
        "{e}"
    );
    assert_eq!(f.config_words(), words);
    assert_eq!(f.app.config(), &running);
    // The new file's health check was dropped with it.
    assert_eq!(f.app.health_checked(), 0);
    assert_eq!(
        f.app
            .region()
            .pub_words(Table::Config)
            .refused
            .load(Ordering::Relaxed),
        1
    );
}

#[test]
fn drain_names_an_unknown_backend_and_publishes_a_known_one() {
    let mut f = Fixture::new("drain");
    let words = f.config_words();
    let line = f.app.handle(Request::Drain("web/nope".parse().unwrap()));
    assert_eq!(
        line,
        proto::error_line("service \"web\" has no backend \"nope\" (backends: web1)")
    );
    assert_eq!(f.config_words(), words);
    assert!(f.app.overrides().is_empty());
    let line = f.app.handle(Request::Drain("web/web1".parse().unwrap()));
    assert!(line.starts_with("{\"ok\":true"), "{line}");
    assert_eq!(f.config_words().1, 2);
    assert_eq!(
        f.app
            .overrides()
            .iter()
            .map(|(s, b, _)| format!("{s}/{b}"))
            .collect::<Vec<_>>(),
        ["web/web1"]
    );
}

#[test]
fn metrics_count_fenced_switches_refused_publications_and_gc_rounds() {
    let mut f = Fixture::new("met");
    // A child that never acknowledges: fenced (killed) by the next publication.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    f.stall_switch_as(child.id());
    let line = f.app.handle(Request::Drain("web/web1".parse().unwrap()));
    assert!(line.starts_with("{\"ok\":true"), "{line}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    // One that cannot be fenced: the next publication is refused.
    f.stall_switch();
    let line = f.app.handle(Request::Enable("web/web1".parse().unwrap()));
    assert!(
        line.starts_with(
            "{\"error\":\"enable web/web1: not published, nothing changed: switch 0 (pid "
        ),
        "{line}"
    );
    // The region has 4096 slots, the GC visits 1024 a tick: one round.
    for _ in 0..4 {
        f.app.tick();
    }
    let text = f.app.render_metrics();
    for line in [
        "switchyard_publish_excluded_switches_total 1",
        "switchyard_publish_refused_total 1",
        "switchyard_switch_fenced_total{switch=\"sw0\"} 1",
        "switchyard_gc_rounds_total 1",
        "switchyard_gc_reclaimed_total{reason=\"expired\"} 0",
        "switchyard_gc_reconciled_total{direction=\"down\"} 0",
    ] {
        assert!(
            text.contains(&format!("\n{line}\n")),
            "{line} not in:\n{text}"
        );
    }
}

/// A controld that replaces a crashed one (adopting its region) publishes
/// the overrides the crashed one had; one that creates a fresh region
/// starts without them.
#[test]
fn overrides_survive_a_crashed_controld_and_a_fresh_start_forgets_them() {
    let mut f = Fixture::new("keep");
    let saved = std::env::temp_dir().join(format!("controld-{}.overrides", f.instance));
    f.app.save_overrides_at(saved.clone(), false);
    let line = f.app.handle(Request::Drain("web/web1".parse().unwrap()));
    assert!(line.starts_with("{\"ok\":true"), "{line}");
    let line = f
        .app
        .handle(Request::Weight("web/web1".parse().unwrap(), Some(9)));
    assert!(line.starts_with("{\"ok\":true"), "{line}");
    // The next controld adopts the region as it is.
    let region = Region::attach_name(
        &shm_layout::region_name(&f.instance),
        shm_layout::Access::ReadWrite,
    )
    .unwrap();
    let mut next = Appliance::new(region, f.app.config().clone(), f.path.clone());
    next.save_overrides_at(saved.clone(), true);
    assert_eq!(next.publish_initial().unwrap(), (4, 2));
    let kept: Vec<String> = next
        .overrides()
        .iter()
        .map(|(s, b, o)| format!("{s}/{b}: {o}"))
        .collect();
    assert_eq!(kept, ["web/web1: drained, weight 9"]);
    let rec = next.snap.backends[0];
    assert_eq!(rec.weight, 0, "drained: no new connections");
    // A clean stop removes the file; a fresh start finds nothing.
    next.forget_saved_overrides();
    assert!(!saved.exists());
    let line = f.app.handle(Request::Enable("web/web1".parse().unwrap()));
    assert!(line.starts_with("{\"ok\":true"), "{line}");
    assert!(saved.exists());
    next.save_overrides_at(saved.clone(), false);
    assert!(!saved.exists());
}

/// The SYN cookie secret: published with the configuration (never zero);
/// a due rotation republishes with the old secret as the previous one; a
/// controld that adopts the region keeps the published secret as its
/// previous one.
#[test]
fn cookie_secrets_are_published_rotated_and_kept_across_a_takeover() {
    let mut f = Fixture::new("cookies");
    let published = |app: &Appliance| cookies::published_secret(app.region());
    let first = published(&f.app).expect("a secret is published");
    assert_eq!(f.app.snap.cookie_secrets, [first, [0, 0]]);
    // Due: rotated and republished by the next tick.
    f.app.cookies = cookies::CookieSecrets::none(Some(first), std::time::Instant::now());
    f.app.cookies.rotate(std::time::Instant::now()).unwrap();
    f.app.tick();
    let second = published(&f.app).unwrap();
    assert_ne!(second, first);
    assert_eq!(f.app.snap.cookie_secrets, [second, first]);
    let region = Region::attach_name(
        &shm_layout::region_name(&f.instance),
        shm_layout::Access::ReadWrite,
    )
    .unwrap();
    let mut next = Appliance::new(region, f.app.config().clone(), f.path.clone());
    next.publish_initial().unwrap();
    let [cur, prev] = next.snap.cookie_secrets;
    assert_eq!(prev, second);
    assert_ne!(cur, second);
    assert_eq!(published(&next), Some(cur));
}
