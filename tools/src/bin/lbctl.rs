//! lbctl: the operator's client for controld's admin socket.
//!
//! Exit codes: 0 done; 1 controld answered with an error (printed), or
//! the answer could not be read; 2 usage; 3 cannot connect to the socket.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use admin_proto::default_socket_path;
use admin_proto::{
    BackendRef, BackendSel, ChangeReply, ConnsQuery, ConnsReply, DEFAULT_CONNS_LIMIT,
    DEFAULT_FLOWS_LIMIT, FlowsQuery, FlowsReply, MAX_CONNS_LIMIT, MAX_WEIGHT, ReloadReply,
    ReopenReply, Reply, Request, ShowReply, StatsReply,
};
use clap::builder::TypedValueParser;
use clap::{Parser, Subcommand};
use serde::de::DeserializeOwned;
use tools::lbctl::{self, CallError};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Control a running switchyard instance through controld's admin socket",
    after_help = "Exit codes: 0 ok, 1 error from controld, 2 usage, 3 cannot connect."
)]
struct Args {
    /// Instance name: talks to its default socket
    /// (/run/switchyard/<instance>.sock for root).
    #[arg(long, short = 'i', default_value = "demo", conflicts_with = "socket")]
    instance: String,
    /// The admin socket ([admin] socket in controld's configuration).
    #[arg(long, short = 's')]
    socket: Option<PathBuf>,
    /// Print controld's JSON answer as it came (before or after the command).
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the answer (a reload waits for the switches).
    #[arg(long, default_value_t = 150)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Services and backends: state, weights, connections, health.
    Show,
    /// Per switch and total counters and rates, per backend connections.
    Stats,
    /// Connections in the table (filtered, at most --limit).
    Conns {
        /// Only connections to this VIP.
        #[arg(long)]
        vip: Option<Ipv4Addr>,
        /// Only connections from this client address.
        #[arg(long)]
        client: Option<Ipv4Addr>,
        /// Only connections to this backend (an address or SERVICE/BACKEND).
        #[arg(long)]
        backend: Option<BackendSel>,
        /// At most this many listed.
        #[arg(long, default_value_t = DEFAULT_CONNS_LIMIT,
              value_parser = clap::value_parser!(u64).range(1..=MAX_CONNS_LIMIT as u64).map(|n| n as usize))]
        limit: usize,
    },
    /// No new connections for a backend; its existing ones continue.
    Drain {
        /// SERVICE/BACKEND
        backend: BackendRef,
    },
    /// Undo drain.
    Enable {
        /// SERVICE/BACKEND
        backend: BackendRef,
    },
    /// Override a backend's weight (0..=65535), or `reset` to the file's.
    Weight {
        /// SERVICE/BACKEND
        backend: BackendRef,
        /// A weight 0..=65535, or `reset`.
        #[arg(value_parser = parse_weight)]
        weight: WeightArg,
    },
    /// Re-read the configuration file (like SIGHUP) and report the result.
    Reload,
    /// Recently closed connections, newest first (filtered, at most --limit).
    Flows {
        /// Only connections of this service.
        #[arg(long)]
        service: Option<String>,
        /// Only connections to this backend (an address or SERVICE/BACKEND).
        #[arg(long)]
        backend: Option<BackendSel>,
        /// Only connections from this client address.
        #[arg(long)]
        client: Option<Ipv4Addr>,
        /// At most this many listed.
        #[arg(long, default_value_t = DEFAULT_FLOWS_LIMIT,
              value_parser = clap::value_parser!(u64).range(1..=MAX_CONNS_LIMIT as u64).map(|n| n as usize))]
        limit: usize,
    },
    /// Reopen the connection log ([records] log) after rotating it (SIGHUP does too).
    Reopen,
}

#[derive(Clone, Debug)]
struct WeightArg(Option<u32>);

fn parse_weight(s: &str) -> Result<WeightArg, String> {
    if s == "reset" {
        return Ok(WeightArg(None));
    }
    match s.parse::<u32>() {
        Ok(w) if w <= MAX_WEIGHT => Ok(WeightArg(Some(w))),
        _ => Err(format!(
            "{s:?} is not a weight 0..={MAX_WEIGHT} or \"reset\""
        )),
    }
}

fn decode<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| format!("unexpected answer from controld: {e}"))
}

fn main() -> ExitCode {
    let a = Args::parse();
    let path = a
        .socket
        .clone()
        .unwrap_or_else(|| default_socket_path(&a.instance));
    let req = match &a.cmd {
        Cmd::Show => Request::Show,
        Cmd::Stats => Request::Stats,
        Cmd::Conns {
            vip,
            client,
            backend,
            limit,
        } => Request::Conns(ConnsQuery {
            vip: *vip,
            client: *client,
            backend: backend.clone(),
            limit: *limit,
        }),
        Cmd::Drain { backend } => Request::Drain(backend.clone()),
        Cmd::Enable { backend } => Request::Enable(backend.clone()),
        Cmd::Weight { backend, weight } => Request::Weight(backend.clone(), weight.0),
        Cmd::Reload => Request::Reload,
        Cmd::Flows {
            service,
            backend,
            client,
            limit,
        } => Request::Flows(FlowsQuery {
            service: service.clone(),
            backend: backend.clone(),
            client: *client,
            limit: *limit,
        }),
        Cmd::Reopen => Request::Reopen,
    };
    let line = match lbctl::call(&path, &req, Duration::from_secs(a.timeout)) {
        Ok(l) => l,
        Err(e @ CallError::Connect { .. }) => {
            eprintln!("lbctl: {e}");
            return ExitCode::from(3);
        }
        Err(e) => {
            eprintln!("lbctl: {e}");
            return ExitCode::from(1);
        }
    };
    let reply: Reply = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbctl: unreadable answer from controld ({e}): {line}");
            return ExitCode::from(1);
        }
    };
    if a.json {
        println!("{line}");
    }
    if !reply.ok {
        eprintln!(
            "lbctl: {}",
            reply
                .error
                .as_deref()
                .unwrap_or("controld reported an error")
        );
        return ExitCode::from(1);
    }
    if a.json {
        return ExitCode::SUCCESS;
    }
    let result = reply.result.unwrap_or_default();
    let text = match &a.cmd {
        Cmd::Show => decode::<ShowReply>(result).map(|v| lbctl::render_show(&v)),
        Cmd::Stats => decode::<StatsReply>(result).map(|v| lbctl::render_stats(&v)),
        Cmd::Conns { .. } => decode::<ConnsReply>(result).map(|v| lbctl::render_conns(&v)),
        Cmd::Drain { .. } | Cmd::Enable { .. } | Cmd::Weight { .. } => {
            decode::<ChangeReply>(result).map(|v| lbctl::render_change(&v))
        }
        Cmd::Reload => decode::<ReloadReply>(result).map(|v| lbctl::render_reload(&v)),
        Cmd::Flows { .. } => decode::<FlowsReply>(result).map(|v| lbctl::render_flows(&v)),
        Cmd::Reopen => decode::<ReopenReply>(result).map(|v| match v.log {
            Some(p) => format!("connection log {p} reopened\n"),
            None => "no connection log configured ([records] log)\n".to_string(),
        }),
    };
    match text {
        Ok(t) => {
            print!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lbctl: {e}");
            ExitCode::from(1)
        }
    }
}
