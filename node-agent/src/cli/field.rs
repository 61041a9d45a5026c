//! Deploying a field: `fleet plan` and `fleet bundle` on the provisioning
//! laptop, `install` and `doctor` on the rack.

use std::path::{Path, PathBuf};

use anyhow::Context;
use deploy::config::RackConfig;
use deploy::field::Field;
use node_agent::bundle::{self, SystemdOutcome};
use node_agent::doctor::{self, Report, Verdict};
use node_agent::field_plan;

use super::exit::Failure;
use super::progress;

/// `fieldrack fleet plan FIELD`: validate, print the failure plan. Exits
/// non-zero when the plan has problems (so scripts can gate on it).
///
/// # Errors
/// [`Failure::BadInput`] for a refused plan; [`Failure::Failed`] for a
/// plan with gaps.
pub fn plan(field: &Path) -> Result<(), Failure> {
    let f = Field::load(field).map_err(|e| Failure::BadInput(e.into()))?;
    let plan = field_plan::failure_plan(&f, &|name| {
        f.packs
            .get(name)
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len())
    });
    print!("{}", field_plan::render(&f, &plan));
    if plan.critical_gaps().is_empty() && plan.full_disks().count() == 0 && plan.unplaced.is_empty()
    {
        Ok(())
    } else {
        Err(Failure::Failed(anyhow::anyhow!(
            "the plan has problems (listed above)"
        )))
    }
}

/// `fieldrack fleet bundle FIELD --out DIR [--fleet DIR]`.
///
/// # Errors
/// A refused plan, an unreadable image or pack, a failed write.
pub fn bundle(field: &Path, out: &Path, fleet: Option<PathBuf>) -> Result<(), Failure> {
    let fleet_dir = fleet.unwrap_or_else(|| {
        field
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("fleet")
    });
    if let Err(e) = Field::load(field) {
        return Err(Failure::BadInput(e.into()));
    }
    let mut printer = progress::stepper();
    let built = bundle::build(field, out, &fleet_dir, &mut printer)?;
    progress::finish();
    for b in &built {
        println!(
            "{}: {} files, {} in {}",
            b.rack,
            b.files,
            node_agent::status::human_bytes(b.bytes),
            b.dir.display()
        );
    }
    println!(
        "fleet key and fleet.toml in {} (keep them on this laptop; ship only the rack directories)",
        fleet_dir.display()
    );
    Ok(())
}

/// `fieldrack install BUNDLE [--root DIR] [--fleet-key KEY]`.
///
/// # Errors
/// A refused bundle (naming the file), a failed write or systemctl.
pub fn install(dir: &Path, root: &Path, fleet_key: Option<&str>) -> Result<(), Failure> {
    let key = fleet_key
        .map(deploy::cert::decode_public_key)
        .transpose()
        .context("--fleet-key")
        .map_err(Failure::BadInput)?;
    let binary = std::env::current_exe().context("finding this binary")?;
    let mut printer = progress::stepper();
    let done = bundle::install(dir, root, key.as_ref(), &binary, &mut printer)
        .with_context(|| format!("bundle {} refused or not installed", dir.display()))?;
    progress::finish();
    if key.is_none() {
        println!(
            "no --fleet-key given: the bundle is intact and signed by the key in its own rack.toml"
        );
    }
    println!("installed rack {}", done.rack);
    println!("  config    {}", done.config.display());
    println!(
        "  data      {}{}",
        done.data_dir.display(),
        if done.data_kept {
            " (a volume store was already there: kept as it was)"
        } else {
            ""
        }
    );
    println!("  unit      {}", done.unit.display());
    match done.systemd {
        SystemdOutcome::Enabled => {
            println!("  systemd   enabled; start it with: systemctl start fieldrack");
        }
        SystemdOutcome::Skipped(why) => {
            println!("  systemd   skipped systemctl: {why}");
        }
    }
    println!(
        "then check the rack with: fieldrack doctor --config {}",
        done.config.display()
    );
    Ok(())
}

/// `fieldrack override quorum --why TEXT [--who NAME] --config rack.toml`.
///
/// # Errors
/// The agent unreachable, or refusing (a majority exists: 409).
pub async fn override_quorum(config: &Path, why: &str, who: Option<String>) -> Result<(), Failure> {
    let who = who
        .or_else(|| std::env::var("SUDO_USER").ok())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    let client = node_agent::client::AgentClient::from_config(config)
        .with_context(|| format!("using {}", config.display()))?;
    let a = client.override_quorum(&who, why).await?;
    println!(
        "quorum override in force (by {}: {}): this rack runs the appliances its last known state gives it, \
         until a majority returns; recorded in the event log",
        a.who, a.why
    );
    Ok(())
}

/// `fieldrack doctor --config rack.toml [--json]`.
///
/// # Errors
/// [`Failure::BadConfig`] for an unusable rack.toml; [`Failure::Failed`]
/// when a check fails.
pub async fn doctor(config_path: &Path, json: bool) -> Result<(), Failure> {
    let config = RackConfig::load(config_path).map_err(|e| Failure::BadConfig(e.into()))?;
    let local = {
        let (p, c) = (config_path.to_owned(), config.clone());
        tokio::task::spawn_blocking(move || doctor::run_local(&p, &c, util::time::unix_secs()))
    };
    let status = async {
        let client = node_agent::client::AgentClient::from_config(config_path)
            .map_err(|e| format!("{e}"))?;
        match tokio::time::timeout(doctor::PROBE_TIMEOUT, client.status()).await {
            Err(_) => Err("the agent did not answer within 4 s".to_string()),
            Ok(r) => r.map_err(|e| format!("{e}")),
        }
    };
    let (local, power, status) = tokio::join!(local, doctor::power(&config), status);
    let mut checks = local.context("the local checks panicked")?;
    checks.push(power);
    let running = status.as_ref().ok();
    checks.push(doctor::filesystem(
        running.and_then(|s| s.volume_store.as_ref()),
        &config.data_dir,
    ));
    checks.push(doctor::clock(running).await);
    checks.extend(doctor::field(
        status.as_ref().map_err(Clone::clone),
        config.mesh.bootstrap.len(),
        config.role,
    ));
    let report = Report { checks };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding")?
        );
    } else {
        print!("{}", report.render());
    }
    if report.worst() == Verdict::Fail {
        let n = report
            .checks
            .iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .count();
        return Err(Failure::Failed(anyhow::anyhow!(
            "not ready: {n} checks failed"
        )));
    }
    Ok(())
}
