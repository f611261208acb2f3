//! `orchestrator demo verify --json`: every event applied exactly once per demo
//! projection, in per-aggregate order.

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::procs::Procs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Verdict {
    Pass,
    Fail,
}

/// One projection's counts.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ProjectionCheck {
    pub(crate) name: String,
    pub(crate) applied: u64,
    pub(crate) exactly_once: u64,
    pub(crate) duplicates: u64,
    pub(crate) missing: u64,
    pub(crate) order_violations: u64,
}

/// What `demo verify --json` found.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct VerifyReport {
    pub(crate) events: u64,
    pub(crate) projections: Vec<ProjectionCheck>,
    /// The first out-of-order handlings, spelled out.
    #[serde(default)]
    pub(crate) out_of_order: Vec<String>,
    pub(crate) verdict: Verdict,
}

impl VerifyReport {
    pub(crate) fn parse(text: &str) -> Result<Self> {
        serde_json::from_str(text).context("demo verify --json printed something else")
    }

    pub(crate) fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }

    /// Whether the failure can never turn into a pass: an event applied twice, or out of order
    /// (missing events may still be applied).
    pub(crate) fn definitive_failure(&self) -> bool {
        self.projections.iter().any(|p| p.duplicates > 0 || p.order_violations > 0)
    }

    /// The report for people, one line each.
    pub(crate) fn lines(&self) -> Vec<String> {
        let mut lines = vec![format!("events: {}", self.events)];
        for p in &self.projections {
            lines.push(format!(
                "{}: {} applied, {} exactly once, {} applied more than once, {} missing, {} out of order",
                p.name, p.applied, p.exactly_once, p.duplicates, p.missing, p.order_violations
            ));
        }
        lines.extend(self.out_of_order.iter().map(|o| format!("out of order: {o}")));
        lines.push(format!("verdict: {}", if self.passed() { "pass" } else { "fail" }));
        lines
    }
}

/// Runs `demo verify --json` (it exits 1 on a failed check, with the report on stdout).
pub(crate) fn verify(procs: &Procs) -> Result<VerifyReport> {
    let output =
        procs.command(&["demo", "verify", "--json"]).output().context("cannot run demo verify")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if stdout.trim().is_empty() {
        bail!("demo verify failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    VerifyReport::parse(&stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_verdict_and_tells_a_definitive_failure() {
        let passed = VerifyReport::parse(
            r#"{"events":10,"projections":[{"name":"demo_audit","applied":10,"exactly_once":10,"duplicates":0,"missing":0,"order_violations":0,"workers":3}],"out_of_order":[],"verdict":"pass"}"#,
        )
        .unwrap();
        assert!(passed.passed() && !passed.definitive_failure());
        assert_eq!(passed.lines().last().unwrap(), "verdict: pass");
        let missing = VerifyReport::parse(
            r#"{"events":10,"projections":[{"name":"demo_audit","applied":9,"exactly_once":9,"duplicates":0,"missing":1,"order_violations":0}],"verdict":"fail"}"#,
        )
        .unwrap();
        assert!(!missing.passed() && !missing.definitive_failure());
        let twice = VerifyReport::parse(
            r#"{"events":10,"projections":[{"name":"demo_audit","applied":10,"exactly_once":9,"duplicates":1,"missing":0,"order_violations":0}],"verdict":"fail"}"#,
        )
        .unwrap();
        assert!(twice.definitive_failure());
        assert!(VerifyReport::parse("verdict: PASS").is_err());
    }
}
