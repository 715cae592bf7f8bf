//! The appliance's running state and what changes it: the configuration
//! and overrides in force, the snapshot last published, the health,
//! agents and loading monitors, the GC; publishing ([`publish`]),
//! reloading ([`reload`]), the admin requests ([`Appliance::handle`]) and
//! the main loop's periodic work ([`Appliance::tick`]). controld's
//! `main.rs` only parses arguments, sets up logging, creates or adopts the
//! region, starts the switches and the admin server, and runs the loop
//! over this.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shm_layout::conntrack::Timeouts;
use shm_layout::{Region, Table};

use crate::admin::metrics;
use crate::admin::proto::{self, BackendRef, ChangeReply, Request, StatsReply};
use crate::admin::rates::Rates;
use crate::admin::scan::Scanner;
use crate::admin::server::Job;
use crate::admin::view::{self, ViewError};
use crate::agents;
use crate::config::Config;
use crate::events::EventDrain;
use crate::gc::Gc;
use crate::health::Monitor;
use crate::ids::{BackendIdentity, IdAllocator};
use crate::loading::Loading;
use crate::master::ConfigSnapshot;
use crate::overrides::Overrides;
use crate::routing::{Mirror, Netlink};
use crate::takeover;

mod cookies;
pub mod host;
pub mod publish;
pub mod reload;
pub mod saved;

pub use publish::PublishError;
pub use reload::{Refusal, ReloadError, restart_only_changes};

/// Why an admin request was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    View(#[from] ViewError),
    #[error("{what} {backend}: not published, nothing changed: {error}")]
    NotPublished {
        what: String,
        backend: BackendRef,
        error: Box<PublishError>,
    },
    #[error(transparent)]
    Reload(#[from] ReloadError),
}

/// controld's state over its region.
pub struct Appliance {
    region: Region,
    /// The file `reload` re-reads.
    config_path: PathBuf,
    /// The running configuration (the file's values).
    cfg: Config,
    /// The operator's runtime changes on top of it (see `crate::overrides`).
    overrides: Overrides,
    /// The configuration snapshot last published (built from both).
    snap: ConfigSnapshot,
    ids: IdAllocator,
    timeouts: Timeouts,
    /// The kernel routing mirror, while `[routing] mirror` is on.
    mirror: Option<Mirror<Netlink>>,
    health: Monitor,
    /// A health or limit change is not published yet (a failed publication
    /// is retried).
    health_dirty: bool,
    /// Effective `max_conns` under controlled loading.
    loading: Loading,
    /// The load agents' listener and the steering of their backends.
    agents: agents::Monitor,
    /// An agent's steering change is not published yet (retried likewise).
    agents_dirty: bool,
    reloads_ok: u64,
    reloads_refused: u64,
    rates: Rates,
    gc: Gc,
    /// Closed-connection records (`crate::records`).
    records: crate::records::Records,
    /// Slots the GC visits per tick.
    gc_per_tick: u32,
    events: EventDrain,
    last_release: Instant,
    last_publish_error: Option<Instant>,
    /// Where the overrides are saved for a controld that replaces this one
    /// (`None`: not saved).
    saved: Option<PathBuf>,
    /// Overrides a crashed controld saved, for the first publication.
    restored: Overrides,
    /// The SYN cookie secrets published with every configuration.
    cookies: cookies::CookieSecrets,
}

impl Appliance {
    /// The state over a region just created or adopted, with `cfg` as the
    /// running configuration, nothing published yet. Backend ids named by
    /// an adopted region's published configuration keep their numbers.
    pub fn new(region: Region, cfg: Config, config_path: PathBuf) -> Self {
        let ids = {
            let counters = region.backend_counters();
            IdAllocator::adopt(
                region.caps().backend_ids,
                &takeover::published_ids(&region),
                |id| {
                    counters
                        .get(id as usize)
                        .map_or(0, |c| c.active.load(Ordering::Relaxed))
                },
            )
        };
        // A full sweep every ~128 ticks (2.5 s): expiry to the second, little CPU.
        let gc_per_tick = (region.caps().conn_slots / 128).clamp(1024, 1 << 15);
        let adopted = cookies::published_secret(&region);
        let cookies = cookies::CookieSecrets::new(adopted, Instant::now()).unwrap_or_else(|e| {
            log::error!(
                "no SYN cookie secret (reading /dev/urandom: {e}): services with syn_proxy forward SYNs to their backends until a secret is made (retried every tick)"
            );
            cookies::CookieSecrets::none(adopted, Instant::now())
        });
        Self {
            cookies,
            region,
            config_path,
            ids,
            cfg,
            overrides: Overrides::default(),
            snap: ConfigSnapshot::default(),
            timeouts: Timeouts {
                tcp_syn_ms: 0,
                tcp_established_ms: 0,
                tcp_fin_ms: 0,
                udp_ms: 0,
                tcp_provisional_ms: 0,
            },
            mirror: None,
            health: Monitor::new(),
            health_dirty: false,
            reloads_ok: 0,
            reloads_refused: 0,
            rates: Rates::default(),
            agents: agents::Monitor::new(),
            agents_dirty: false,
            loading: Loading::new(),
            gc: Gc::default(),
            records: crate::records::Records::default(),
            gc_per_tick,
            events: EventDrain::default(),
            last_release: Instant::now(),
            last_publish_error: None,
            saved: None,
            restored: Overrides::default(),
        }
    }

    /// Saves the overrides at `path` from now on (see [`saved`]). Over an
    /// adopted region, the overrides saved there by the controld that
    /// crashed are restored by [`Appliance::publish_initial`]; over a
    /// fresh one, a stale file is removed.
    pub fn save_overrides_at(&mut self, path: PathBuf, adopted: bool) {
        if adopted {
            match saved::load(&path) {
                Ok(o) => self.restored = o,
                Err(e) => log::error!("runtime overrides not restored: {e}"),
            }
        } else {
            saved::remove(&path);
        }
        self.saved = Some(path);
    }

    /// Stops saving the overrides and removes their file (a clean stop:
    /// the next controld starts over).
    pub fn forget_saved_overrides(&mut self) {
        if let Some(p) = self.saved.take() {
            saved::remove(&p);
        }
    }

    /// Publishes the running configuration and routing for the first time,
    /// with the overrides restored from a crashed controld (those of
    /// backends the configuration still has; the reload rule):
    /// `(configuration generation, routing generation)`.
    pub fn publish_initial(&mut self) -> Result<(u64, u64), PublishError> {
        let cfg = self.cfg.clone();
        let mut overrides = std::mem::take(&mut self.restored);
        let carried = overrides.carry_over(&cfg);
        for (n, o) in &carried.kept {
            log::info!("runtime override {n}: {o} restored from the controld this one replaces");
        }
        for (n, o) in &carried.dropped {
            log::warn!("runtime override {n}: {o} not restored: backend not configured");
        }
        self.publish_all(cfg, overrides)
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The running configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn overrides(&self) -> &Overrides {
        &self.overrides
    }

    /// Backends under health checks.
    pub fn health_checked(&self) -> usize {
        self.health.len()
    }

    /// Whether the kernel routing mirror is open.
    pub fn mirroring(&self) -> bool {
        self.mirror.is_some()
    }

    /// Opens the connection log `[records] log` names (if any).
    pub fn open_connection_log(&mut self) -> std::io::Result<()> {
        self.records.open_log(self.cfg.records.log.clone())
    }

    /// Reopens the connection log (SIGHUP, `lbctl reopen`): its path, if any.
    pub fn reopen_connection_log(&self) -> Option<PathBuf> {
        self.records.reopen_log()
    }

    /// The closed-connection records' state.
    pub fn records(&self) -> &crate::records::Records {
        &self.records
    }

    /// Drains the switches' records rings and takes the GC's records.
    fn take_records(&mut self) {
        let ctx = view::Ctx {
            cfg: &self.cfg,
            overrides: &self.overrides,
            snap: &self.snap,
            counters: self.region.backend_counters(),
            health: Box::new(|_, _| None),
        };
        let names = || view::record_names(&ctx);
        let gc_closed = std::mem::take(&mut self.gc.closed);
        self.records.add_all(&gc_closed, &self.region, &names);
        self.records.drain(&self.region, &names);
    }

    /// The GC's totals since this controld started.
    pub fn gc_totals(&self) -> crate::gc::GcStats {
        self.gc.totals
    }

    /// The health checks' verdict on a backend (`None`: not checked).
    fn health_of(&self, service: &str, backend: &str) -> Option<proto::Health> {
        let s = self.cfg.services.iter().find(|s| s.name == service)?;
        let b = s.backends.iter().find(|b| b.name == backend)?;
        let ident = BackendIdentity::of(s, b);
        self.health.health(&ident).map(|h| {
            if h.is_down() {
                proto::Health::Down
            } else {
                proto::Health::Up
            }
        })
    }

    fn ctx(&self) -> view::Ctx<'_> {
        view::Ctx {
            cfg: &self.cfg,
            overrides: &self.overrides,
            snap: &self.snap,
            counters: self.region.backend_counters(),
            health: Box::new(|s, b| self.health_of(s, b)),
        }
    }

    pub fn stats(&self) -> StatsReply {
        view::stats(&self.region, &self.ctx(), &self.rates)
    }

    /// `drain`, `enable`, `weight`: changes the overrides and republishes at once.
    fn change(
        &mut self,
        b: &BackendRef,
        what: &str,
        f: impl FnOnce(&mut Overrides),
    ) -> Result<ChangeReply, AdminError> {
        let (si, bi) = view::find_backend(&self.cfg, b)?;
        let mut overrides = self.overrides.clone();
        f(&mut overrides);
        let generation = if overrides == self.overrides {
            self.region.generation(Table::Config)
        } else {
            let cfg = self.cfg.clone();
            let g = self.publish_config(&cfg, &overrides).map_err(|error| {
                AdminError::NotPublished {
                    what: what.to_string(),
                    backend: b.clone(),
                    error: Box::new(error),
                }
            })?;
            log::info!("{what} {b}: configuration generation {g}");
            g
        };
        Ok(ChangeReply {
            generation,
            service: b.service.clone(),
            backend: view::backend_view(&self.ctx(), si, bi),
        })
    }

    /// Answers one admin request as its reply line (on the main loop,
    /// which owns the state).
    pub fn handle(&mut self, req: Request) -> String {
        match self.answer(req) {
            Ok(line) => line,
            Err(e) => proto::error_line(&e.to_string()),
        }
    }

    fn answer(&mut self, req: Request) -> Result<String, AdminError> {
        let line = match req {
            Request::Show => {
                let (g, rg) = self.generations();
                proto::ok_line(&view::show(&self.ctx(), g, rg))
            }
            Request::Stats => proto::ok_line(&self.stats()),
            // Planned and run off the loop by `serve` (`Scanner`); here
            // only if one reaches this function another way.
            Request::Conns(q) => {
                proto::ok_line(&view::conns(&self.region, &self.ctx(), &self.timeouts, &q)?)
            }
            Request::Drain(b) => {
                proto::ok_line(&self.change(&b, "drain", |o| o.drain(&b.service, &b.backend))?)
            }
            Request::Enable(b) => {
                proto::ok_line(&self.change(&b, "enable", |o| o.enable(&b.service, &b.backend))?)
            }
            Request::Weight(b, w) => {
                let what = match w {
                    Some(w) => format!("weight {w}"),
                    None => "weight reset".to_string(),
                };
                proto::ok_line(
                    &self.change(&b, &what, |o| o.set_weight(&b.service, &b.backend, w))?,
                )
            }
            Request::Reload => {
                let path = self.config_path.clone();
                proto::ok_line(&self.reload(&path)?)
            }
            Request::Flows(q) => proto::ok_line(&self.records.flows(&q)),
            Request::Reopen => {
                let log = self.reopen_connection_log();
                if let Some(p) = &log {
                    log::info!("connection log {}: reopening", p.display());
                }
                proto::ok_line(&proto::ReopenReply {
                    log: log.map(|p| p.display().to_string()),
                })
            }
        };
        Ok(line)
    }

    fn generations(&self) -> (u64, u64) {
        (
            self.region.generation(Table::Config),
            self.region.generation(Table::Routing),
        )
    }

    /// The Prometheus exposition.
    pub fn render_metrics(&self) -> String {
        let (g, rg) = self.generations();
        let show = view::show(&self.ctx(), g, rg);
        let words = [Table::Config, Table::Routing].map(|t| self.region.pub_words(t));
        let extra = metrics::Extra {
            reloads_ok: self.reloads_ok,
            reloads_refused: self.reloads_refused,
            excluded_switches: words
                .iter()
                .map(|w| w.excluded.load(Ordering::Relaxed))
                .sum(),
            refused_publications: words
                .iter()
                .map(|w| w.refused.load(Ordering::Relaxed))
                .sum(),
            fenced: self
                .region
                .switch_slots()
                .iter()
                .map(|s| u64::from(s.fenced.load(Ordering::Relaxed)))
                .collect(),
            gc: self.gc.totals,
            overrides: self.overrides.iter().count(),
            agents: self
                .cfg
                .agents
                .is_some()
                .then(|| self.agents.status(Instant::now()).counters),
        };
        let mut text = metrics::render(&show, &self.stats(), &extra);
        text.push_str(&self.records.render_metrics());
        text
    }

    /// Answers one job of the admin server. `conns` is planned here and
    /// scanned off the loop by `scanner`; `metrics` caches one rendering
    /// of the metrics until a request may have changed the state.
    pub fn serve(&mut self, job: Job, scanner: &Scanner, metrics: &mut Option<Arc<String>>) {
        match job {
            Job::Request {
                req: Request::Conns(q),
                reply,
            } => match view::conns_plan(&self.ctx(), &self.timeouts, &q) {
                Ok(plan) => scanner.submit(plan, reply),
                Err(e) => {
                    let _ = reply.send(proto::error_line(&e.to_string()));
                }
            },
            Job::Request { req, reply } => {
                *metrics = None;
                let _ = reply.send(self.handle(req));
            }
            Job::Metrics { reply } => {
                let text = metrics.get_or_insert_with(|| Arc::new(self.render_metrics()));
                let _ = reply.send(String::clone(text));
            }
        }
    }

    /// The main loop's periodic work, once per tick: the routing mirror,
    /// health checks, agents and loading limits (republishing what they
    /// changed; a failed publication is retried next tick), a GC step, the
    /// switches' events, idle backend ids, and the rate samples.
    pub fn tick(&mut self) {
        self.poll_mirror();
        if !self.health.poll(Instant::now()).is_empty() {
            self.health_dirty = true;
        }
        if self.agents.poll(Instant::now()) {
            self.agents_dirty = true;
        }
        if self.poll_loading() {
            self.health_dirty = true;
        }
        let cookies_due = self.rotate_cookie_secret();
        if self.health_dirty || self.agents_dirty || cookies_due {
            // Within this tick of the deciding result: out of (or back in)
            // the tables one publication later.
            let what = if self.health_dirty {
                "health or limit"
            } else if cookies_due {
                "SYN cookie secret"
            } else {
                "agent"
            };
            let (cfg, overrides) = (self.cfg.clone(), self.overrides.clone());
            if let Err(e) = self.publish_config(&cfg, &overrides)
                && self
                    .last_publish_error
                    .is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10))
            {
                log::error!("publishing a {what} change failed (retried every tick): {e}");
                self.last_publish_error = Some(Instant::now());
            }
        }
        self.gc.step(&self.region, &self.timeouts, self.gc_per_tick);
        self.take_records();
        self.events.drain(&self.region);
        if self.last_release.elapsed() > Duration::from_secs(1) {
            self.release_idle_ids();
            self.last_release = Instant::now();
        }
        if self.rates.due(Instant::now()) {
            let s = view::sample(&self.region, &self.snap);
            self.rates.push(s);
        }
    }

    /// Rotates the SYN cookie secret if it is due; whether the rotation
    /// (or a secret not published yet) needs a publication. A failed
    /// rotation keeps the secrets and is retried next tick, logged at most
    /// every 10 s.
    fn rotate_cookie_secret(&mut self) -> bool {
        let now = Instant::now();
        if self.cookies.due(now)
            && let Err(e) = self.cookies.rotate(now)
        {
            if self
                .last_publish_error
                .is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10))
            {
                log::error!("rotating the SYN cookie secret (reading /dev/urandom): {e}");
                self.last_publish_error = Some(now);
            }
            return false;
        }
        self.snap.cookie_secrets != self.cookies.pair()
    }

    /// Frees the ids of departed backends whose last connection is gone.
    fn release_idle_ids(&mut self) {
        let counters = self.region.backend_counters();
        let released = self.ids.release_idle(|id| {
            counters
                .get(id as usize)
                .map(|c| c.active.load(Ordering::Relaxed))
                .unwrap_or(0)
        });
        // No configuration names a released id and none will until it is
        // assigned again: its totals restart at zero for the next owner.
        for c in released.iter().filter_map(|&id| counters.get(id as usize)) {
            c.reset_totals();
        }
        for id in released {
            log::info!(
                "backend id {id} freed: its backend left the configuration and its last connection is gone"
            );
        }
    }
}

#[cfg(test)]
mod tests;
