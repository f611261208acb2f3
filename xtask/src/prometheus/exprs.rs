//! Every PromQL expression the project ships, read from the files themselves (so a new panel, rule
//! or documented query is checked without touching this code):
//!
//! - the Grafana dashboard: each panel target's `expr` (rows' nested panels too) and each query
//!   variable, with the dashboard's variables and Grafana's `$__rate_interval`-style globals
//!   substituted;
//! - prometheus-adapter rules (the ConfigMap, and Helm values in the docs): each `seriesQuery`,
//!   and each `metricsQuery` with `<<.Series>>`, `<<.LabelMatchers>>` and `<<.GroupBy>>` expanded
//!   as prometheus-adapter would for an HPA asking for the pods (custom rules) or the replica set
//!   (external rules);
//! - Markdown: ```promql blocks (one expression per line, indented lines continuing it, `#`
//!   comments skipped) and, in ```yaml blocks, alert rules' `expr` with the threshold comparison
//!   stripped, so the expression under it is the one checked.

use std::path::Path;

use anyhow::{Context, Result, bail};
use pulldown_cmark::{CodeBlockKind, Event, Parser, Tag, TagEnd};
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

/// One expression to evaluate.
#[derive(Debug, Clone)]
pub(crate) struct Expr {
    /// Where it comes from, for the report: file and panel, rule or line.
    pub(crate) origin: String,
    /// The PromQL, substituted and expanded.
    pub(crate) query: String,
}

/// What the expressions are expanded with: the scraped cluster as an HPA or Grafana would see it.
#[derive(Debug, Clone)]
pub(crate) struct Scene {
    pub(crate) replica_set: String,
    pub(crate) namespace: String,
    pub(crate) pods: Vec<String>,
    /// Grafana's `$__rate_interval` and `$__interval`.
    pub(crate) rate_interval: String,
}

/// The expressions of one file, by its kind (its extension and name).
pub(crate) fn from_file(path: &Path, scene: &Scene) -> Result<Vec<Expr>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let name = path.display().to_string();
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => dashboard(&name, &text, scene),
        Some("yaml" | "yml") => adapter_file(&name, &text, scene),
        Some("md") => markdown(&name, &text, scene),
        _ => bail!("{name}: no expressions to read from this kind of file"),
    }
}

// ---- Grafana ----

fn dashboard(name: &str, text: &str, scene: &Scene) -> Result<Vec<Expr>> {
    let board: Value = serde_json::from_str(text).with_context(|| format!("{name}: not JSON"))?;
    let variables: Vec<&Value> = board["templating"]["list"]
        .as_array()
        .map(|list| list.iter().collect())
        .unwrap_or_default();
    let mut found = Vec::new();
    for variable in &variables {
        if variable["type"] != "query" {
            continue;
        }
        let query = match &variable["query"] {
            Value::String(query) => query.as_str(),
            other => other["query"].as_str().unwrap_or_default(),
        };
        let var = variable["name"].as_str().unwrap_or("?");
        let query = substitute(query, &variables, scene)
            .with_context(|| format!("{name}: variable {var}"))?;
        found.push(Expr {
            origin: format!("{name}: variable ${var}"),
            query: variable_query(&query),
        });
    }
    let mut panels = Vec::new();
    collect_panels(&board["panels"], &mut panels);
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else { continue };
            let query = substitute(expr, &variables, scene)
                .with_context(|| format!("{name}: panel {title:?}"))?;
            let refid = target["refId"].as_str().unwrap_or("?");
            found.push(Expr { origin: format!("{name}: panel {title:?} ({refid})"), query });
        }
    }
    Ok(found)
}

fn collect_panels<'a>(panels: &'a Value, into: &mut Vec<&'a Value>) {
    for panel in panels.as_array().into_iter().flatten() {
        into.push(panel);
        collect_panels(&panel["panels"], into);
    }
}

/// The PromQL behind a query variable: `label_values(m, label)` lists `label` of `m`'s series,
/// so `m` must have series with it; `query_result(q)` is `q`.
fn variable_query(query: &str) -> String {
    let query = query.trim();
    if let Some(inner) = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')) {
        return match inner.rsplit_once(',') {
            Some((metric, label)) => format!("count by ({}) ({})", label.trim(), metric.trim()),
            None => format!("count by ({inner}) ({{{inner}!=\"\"}})"),
        };
    }
    if let Some(inner) = query.strip_prefix("query_result(").and_then(|q| q.strip_suffix(')')) {
        return inner.to_owned();
    }
    query.to_owned()
}

/// Replaces `$name`, `${name}` and `[[name]]` with the variable's value, and Grafana's globals.
fn substitute(expr: &str, variables: &[&Value], scene: &Scene) -> Result<String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find(['$', '[']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let (name, used) = if let Some(braced) = tail.strip_prefix("${") {
            let end = braced.find('}').context("unclosed ${")?;
            // ${name:format}: the format does not matter for one value.
            (braced[..end].split(':').next().unwrap_or_default(), end + 3)
        } else if let Some(bracketed) = tail.strip_prefix("[[") {
            let end = bracketed.find("]]").context("unclosed [[")?;
            (&bracketed[..end], end + 4)
        } else if let Some(plain) = tail.strip_prefix('$') {
            let len = plain
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(plain.len());
            (&plain[..len], len + 1)
        } else {
            ("", 0)
        };
        if name.is_empty() {
            // A `$` in a regex or a `[` of a range: not a variable.
            out.push_str(&tail[..1]);
            rest = &tail[1..];
            continue;
        }
        out.push_str(&value_of(name, variables, scene)?);
        rest = &tail[used..];
    }
    out.push_str(rest);
    Ok(out)
}

fn value_of(name: &str, variables: &[&Value], scene: &Scene) -> Result<String> {
    let global = match name {
        "__rate_interval" | "__interval" => Some(scene.rate_interval.clone()),
        "__range" => Some("1h".to_owned()),
        "__range_s" => Some("3600".to_owned()),
        _ => None,
    };
    if let Some(value) = global {
        return Ok(value);
    }
    let Some(variable) = variables.iter().find(|v| v["name"] == name) else {
        bail!("${name} is neither a dashboard variable nor a Grafana global this check knows");
    };
    Ok(match (name, variable["type"].as_str()) {
        // What the query variables list on the scraped cluster.
        ("replica_set", _) => scene.replica_set.clone(),
        ("namespace", _) => scene.namespace.clone(),
        ("pod", _) => scene.pods.join("|"),
        (_, Some("constant" | "textbox")) => variable["query"].as_str().unwrap_or("").to_owned(),
        (_, Some("custom")) => {
            variable["query"].as_str().unwrap_or("").split(',').next().unwrap_or("").to_owned()
        }
        (_, Some("interval")) => scene.rate_interval.clone(),
        (_, kind) => bail!("no value for ${name} (a {} variable)", kind.unwrap_or("typeless")),
    })
}

// ---- prometheus-adapter ----

/// Which API an adapter rule serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RuleKind {
    /// `rules` (Helm: `rules.custom`): per object, here per pod.
    Custom,
    /// `externalRules` (Helm: `rules.external`).
    External,
}

fn adapter_file(name: &str, text: &str, scene: &Scene) -> Result<Vec<Expr>> {
    let documents = YamlLoader::load_from_str(text).with_context(|| format!("{name}: not YAML"))?;
    let mut found = Vec::new();
    for document in &documents {
        walk_yaml(name, document, None, scene, &mut found)?;
    }
    Ok(found)
}

/// Finds adapter rules and alert rules anywhere in a YAML tree, descending into strings that hold
/// YAML themselves (a ConfigMap's `config.yaml: |`).
fn walk_yaml(
    name: &str,
    node: &Yaml,
    kind: Option<RuleKind>,
    scene: &Scene,
    found: &mut Vec<Expr>,
) -> Result<()> {
    match node {
        Yaml::Hash(hash) => {
            let field = |key: &str| hash.get(&Yaml::String(key.to_owned()));
            if let Some(Yaml::String(metrics_query)) = field("metricsQuery") {
                let series_query = field("seriesQuery").and_then(Yaml::as_str).unwrap_or_default();
                let kind = kind.unwrap_or(RuleKind::Custom);
                found.extend(adapter_rule(name, node, series_query, metrics_query, kind, scene)?);
                return Ok(());
            }
            if let (Some(Yaml::String(expr)), Some(alert)) =
                (field("expr"), field("alert").or(field("record")))
            {
                let alert = alert.as_str().unwrap_or("?");
                found.push(Expr {
                    origin: format!("{name}: rule {alert}"),
                    query: strip_threshold(expr).to_owned(),
                });
                return Ok(());
            }
            for (key, value) in hash {
                let kind = match key.as_str() {
                    Some("rules" | "custom") if kind.is_none() => Some(RuleKind::Custom),
                    Some("externalRules" | "external") => Some(RuleKind::External),
                    _ => kind,
                };
                walk_yaml(name, value, kind, scene, found)?;
            }
        }
        Yaml::Array(items) => {
            for item in items {
                walk_yaml(name, item, kind, scene, found)?;
            }
        }
        Yaml::String(text) if text.contains("metricsQuery") || text.contains("expr:") => {
            let inner = YamlLoader::load_from_str(text)
                .with_context(|| format!("{name}: embedded YAML does not parse"))?;
            for document in &inner {
                walk_yaml(name, document, kind, scene, found)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A rule's series query and its metrics query, expanded as prometheus-adapter's query builder
/// does: for custom rules, the label matchers select the namespace and the pods asked for
/// (`pod=~"a|b"`) and `GroupBy` is the pod label; for external rules, they are the HPA's metric
/// selector (`replica_set="..."`) and the namespace, with no `GroupBy`.
fn adapter_rule(
    name: &str,
    rule: &Yaml,
    series_query: &str,
    metrics_query: &str,
    kind: RuleKind,
    scene: &Scene,
) -> Result<Vec<Expr>> {
    let series = series_query.split('{').next().unwrap_or_default().trim();
    if series.is_empty() {
        bail!("{name}: a rule's seriesQuery {series_query:?} names no metric");
    }
    // Which labels stand for the namespace and the pod (resources.overrides).
    let label_for = |resource: &str| -> Option<String> {
        let overrides = rule["resources"]["overrides"].as_hash()?;
        overrides.iter().find_map(|(label, target)| {
            let target = target["resource"].as_str()?;
            (target == resource || target == format!("{resource}s"))
                .then(|| label.as_str().map(str::to_owned))
                .flatten()
        })
    };
    let namespace = label_for("namespace");
    let mut matchers = Vec::new();
    let group_by = match kind {
        RuleKind::Custom => {
            if let Some(label) = &namespace {
                matchers.push(format!("{label}=\"{}\"", scene.namespace));
            }
            let pod = label_for("pod").with_context(|| {
                format!("{name}: custom rule for {series} maps no label to pods")
            })?;
            let pods = scene.pods.join("|");
            let op = if scene.pods.len() > 1 { "=~" } else { "=" };
            matchers.push(format!("{pod}{op}\"{pods}\""));
            pod
        }
        RuleKind::External => {
            matchers.push(format!("replica_set=\"{}\"", scene.replica_set));
            if let Some(label) = &namespace {
                matchers.push(format!("{label}=\"{}\"", scene.namespace));
            }
            String::new()
        }
    };
    let expanded = metrics_query
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", &matchers.join(","))
        .replace("<<.GroupBy>>", &group_by);
    if expanded.contains("<<") {
        bail!("{name}: metricsQuery {metrics_query:?} uses a template this check does not expand");
    }
    let which = match kind {
        RuleKind::Custom => "custom",
        RuleKind::External => "external",
    };
    Ok(vec![
        Expr {
            origin: format!("{name}: {which} rule for {series}, seriesQuery"),
            query: series_query.to_owned(),
        },
        Expr {
            origin: format!("{name}: {which} rule for {series}, metricsQuery"),
            query: expanded,
        },
    ])
}

// ---- Markdown ----

fn markdown(name: &str, text: &str, scene: &Scene) -> Result<Vec<Expr>> {
    let mut found = Vec::new();
    let mut block: Option<(String, String)> = None;
    for event in Parser::new(text) {
        match event {
            Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(lang))) => {
                block = Some((lang.to_string(), String::new()));
            }
            Event::Text(chunk) => {
                if let Some((_, body)) = &mut block {
                    body.push_str(&chunk);
                }
            }
            Event::End(TagEnd::CodeBlock) => {
                let Some((lang, body)) = block.take() else { continue };
                match lang.split_whitespace().next().unwrap_or_default() {
                    "promql" => found.extend(promql_block(name, &body)),
                    "yaml" | "yml" if body.contains("metricsQuery") || body.contains("expr:") => {
                        found.extend(
                            adapter_file(name, &body, scene)
                                .with_context(|| format!("{name}: a yaml block"))?,
                        );
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    Ok(found)
}

/// One expression per line; a line starting with whitespace continues the previous one.
fn promql_block(name: &str, body: &str) -> Vec<Expr> {
    let mut found: Vec<Expr> = Vec::new();
    let mut comment = String::new();
    let mut continuable = false;
    for line in body.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continuable = false;
        } else if let Some(text) = trimmed.strip_prefix('#') {
            comment = text.trim().to_owned();
            continuable = false;
        } else if continuable && line.starts_with(char::is_whitespace) {
            let last = found.last_mut().expect("continuable after an expression");
            last.query.push(' ');
            last.query.push_str(trimmed);
        } else {
            found.push(Expr { origin: format!("{name}: {comment:?}"), query: trimmed.to_owned() });
            continuable = true;
        }
    }
    found
}

/// `A > 30` -> `A`: the last comparison with a number at the top level (outside brackets and
/// quotes) is cut off, with its `bool` modifier. Anything else is returned as it is.
pub(crate) fn strip_threshold(expr: &str) -> &str {
    let bytes = expr.as_bytes();
    let (mut depth, mut quote, mut cut) = (0i32, None::<u8>, None);
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match quote {
            Some(_) if c == b'\\' => i += 1,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                b'"' | b'\'' | b'`' => quote = Some(c),
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                b'=' | b'!' | b'>' | b'<' if depth == 0 => {
                    let two = bytes.get(i + 1) == Some(&b'=');
                    if (c == b'=' || c == b'!') && !two {
                        // `=~`, `!~` or a lone `=`: not a comparison.
                    } else {
                        let rhs = expr[i + 1 + usize::from(two)..].trim();
                        let rhs = rhs.strip_prefix("bool").map_or(rhs, str::trim);
                        if rhs.parse::<f64>().is_ok() {
                            cut = Some(i);
                        }
                        i += usize::from(two);
                    }
                }
                _ => {}
            },
        }
        i += 1;
    }
    cut.map_or(expr, |at| expr[..at].trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scene() -> Scene {
        Scene {
            replica_set: "rs".into(),
            namespace: "ns".into(),
            pods: vec!["p1".into(), "p2".into()],
            rate_interval: "1m".into(),
        }
    }

    #[test]
    fn thresholds_are_stripped_at_the_top_level_only() {
        assert_eq!(strip_threshold("sum(x) == 0"), "sum(x)");
        assert_eq!(strip_threshold("max(y{a=~\"b\"}) > bool 30"), "max(y{a=~\"b\"})");
        assert_eq!(strip_threshold("rate(z[5m]) > 0.01"), "rate(z[5m])");
        assert_eq!(strip_threshold("a{x!=\"1>2\"} >= 1e3"), "a{x!=\"1>2\"}");
        assert_eq!(strip_threshold("a / b"), "a / b");
        assert_eq!(strip_threshold("a > b"), "a > b");
        assert_eq!(strip_threshold("(a > 1) * 2"), "(a > 1) * 2");
    }

    #[test]
    fn dashboard_variables_and_globals_are_substituted() {
        let board = serde_json::json!({
            "templating": {"list": [
                {"name": "replica_set", "type": "query",
                 "query": {"query": "label_values(m_active, replica_set)"}},
                {"name": "DS", "type": "datasource"}
            ]},
            "panels": [
                {"type": "row", "title": "R", "panels": [
                    {"title": "Nested", "targets": [{"refId": "A",
                     "expr": "sum(rate(m_total{replica_set=~\"$replica_set\"}[$__rate_interval]))"}]}
                ]},
                {"title": "Top", "targets": [{"refId": "B", "expr": "max(m{r=\"${replica_set}\"}) [[replica_set]]"}]}
            ]
        });
        let found = dashboard("d.json", &board.to_string(), &scene()).unwrap();
        let queries: Vec<&str> = found.iter().map(|e| e.query.as_str()).collect();
        assert_eq!(
            queries,
            [
                "count by (replica_set) (m_active)",
                "sum(rate(m_total{replica_set=~\"rs\"}[1m]))",
                "max(m{r=\"rs\"}) rs",
            ]
        );
        let unknown = serde_json::json!({"panels": [{"title": "T", "targets": [{"expr": "x{a=\"$nope\"}"}]}]});
        assert!(dashboard("d.json", &unknown.to_string(), &scene()).is_err());
    }

    #[test]
    fn adapter_templates_expand_like_prometheus_adapter() {
        let configmap = r#"
data:
  config.yaml: |
    rules:
      - seriesQuery: 'lag{namespace!="",pod!=""}'
        resources:
          overrides:
            namespace: {resource: "namespace"}
            pod: {resource: "pod"}
        metricsQuery: 'max by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>})'
    externalRules:
      - seriesQuery: 'lag{namespace!=""}'
        resources:
          overrides:
            namespace: {resource: "namespace"}
        metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>})'
"#;
        let found = adapter_file("rules.yaml", configmap, &scene()).unwrap();
        let queries: Vec<&str> = found.iter().map(|e| e.query.as_str()).collect();
        assert_eq!(
            queries,
            [
                "lag{namespace!=\"\",pod!=\"\"}",
                "max by (pod) (lag{namespace=\"ns\",pod=~\"p1|p2\"})",
                "lag{namespace!=\"\"}",
                "sum(lag{replica_set=\"rs\",namespace=\"ns\"})",
            ]
        );
    }

    #[test]
    fn markdown_promql_blocks_and_alert_rules_are_read() {
        let doc = "Text\n\n```promql\n# Live\nmax(a)\n\n# Mean\nsum(b)\n  / sum(c)\n```\n\n\
                   ```yaml\ngroups:\n  - rules:\n      - alert: X\n        expr: sum(d) > 5\n```\n\n\
                   ```bash\necho expr: no\n```\n";
        let found = markdown("m.md", doc, &scene()).unwrap();
        let queries: Vec<&str> = found.iter().map(|e| e.query.as_str()).collect();
        assert_eq!(queries, ["max(a)", "sum(b) / sum(c)", "sum(d)"]);
        assert_eq!(found[1].origin, "m.md: \"Mean\"");
    }
}
