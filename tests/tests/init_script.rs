//! The init script drives the real appliance: start, status, reload, stop,
//! with a pid file and LSB exit codes.

use std::process::Command;
use std::time::{Duration, Instant};

use shm_layout::Table;
use switchyard_tests::{Cfg, bin_dir, render, unique};

fn script(dir: &std::path::Path, cmd: &str) -> (i32, String) {
    let root = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/init.d/switchyard"
    );
    let out = Command::new("sh")
        .arg(root)
        .arg(cmd)
        .env("SWITCHYARD_CONFIG", dir.join("switchyard.toml"))
        .env("SWITCHYARD_PIDFILE", dir.join("switchyard.pid"))
        .env("SWITCHYARD_LOG", dir.join("switchyard.log"))
        .env("SWITCHYARD_BIN", bin_dir())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = script(&self.0, "stop");
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn init_script_start_status_reload_stop() {
    let inst = unique("init");
    let dir = Dir(std::env::temp_dir().join(format!("switchyard-init-{inst}")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let cfg = render(&inst, &Cfg::default());
    std::fs::write(dir.0.join("switchyard.toml"), &cfg).unwrap();

    assert_eq!(script(&dir.0, "status").0, 3, "not running yet");
    let (code, text) = script(&dir.0, "start");
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("started"), "{text}");
    let (code, text) = script(&dir.0, "status");
    assert_eq!(code, 0, "{text}");
    let pid: u32 = std::fs::read_to_string(dir.0.join("switchyard.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(shm_layout::time::pid_alive(pid));
    assert_eq!(
        script(&dir.0, "start").0,
        0,
        "start when running is a no-op"
    );

    // Writes the file and asks the script to reload it.
    let reload_with = |text: String| {
        std::fs::write(dir.0.join("switchyard.toml"), text).unwrap();
        script(&dir.0, "reload")
    };
    // Reload with a changed weight publishes a new generation.
    let region = shm_layout::Region::attach(&inst, shm_layout::Access::ReadOnly).unwrap();
    let before = region.generation(Table::Config);
    let (code, text) = reload_with(cfg.replace("weight = 3", "weight = 4"));
    assert_eq!(code, 0, "{text}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while region.generation(Table::Config) == before {
        assert!(Instant::now() < deadline, "reload not published");
        std::thread::sleep(Duration::from_millis(10));
    }
    // An invalid file is refused by the script itself; nothing is signalled.
    let (code, text) = reload_with(cfg.replace("weight = 3", "weight = 70000"));
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("70000"), "{text}");
    // A valid file that changes a restart-only section passes --check; the
    // script reports controld's refusal (through lbctl), not "reloading".
    let g = region.generation(Table::Config);
    let (code, text) = reload_with(cfg.replace("connections = 262144", "connections = 524288"));
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("reload refused") && text.contains("[limits] changed, which needs a restart"),
        "{text}"
    );
    assert_eq!(
        region.generation(Table::Config),
        g,
        "running configuration kept"
    );
    drop(region);

    let (code, text) = script(&dir.0, "stop");
    assert_eq!(code, 0, "{text}");
    assert!(!shm_layout::time::pid_alive(pid));
    assert_eq!(script(&dir.0, "status").0, 3);
    assert!(
        !std::path::Path::new(&format!("/dev/shm/switchyard.{inst}")).exists(),
        "region removed"
    );
    assert_eq!(script(&dir.0, "bogus").0, 2);
}
