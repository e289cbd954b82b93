//! The Kubernetes example in deploy/kubernetes: every manifest validates against the Kubernetes
//! 1.29 and 1.31 API schemas with `kubernetes-validate --strict` (PyPI; it bundles the schemas
//! and runs offline), the ConfigMap's dbward.toml passes the real `dbward validate`, and the pod
//! templates agree with that config: probe paths and ports with `[admin] listen`, the projected
//! token's mount with `vault.auth.token_file`, the socket emptyDir with the Unix listener.
//!
//! kubernetes-validate (and the PyYAML it brings, used here to read the manifests) is installed
//! into .venv by scripts/test. Without it every test here fails, unless DBWARD_SKIP_EXTRAS=1
//! asks to skip, as tests/ops.rs does for Prometheus.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const VERSIONS: [&str; 2] = ["1.29.0", "1.31.0"];
/// Files that are no Kubernetes API objects (Kustomization) or need a CRD (PodMonitor): the
/// validator has no schema for them, so they are checked by the tests below instead.
const NOT_CORE: [&str; 2] = ["kustomization.yaml", "podmonitor.yaml"];

fn k8s_dir() -> PathBuf {
    Path::new(REPO).join("deploy/kubernetes")
}

/// A Python that has kubernetes_validate and yaml: `$DBWARD_PYTHON`, .venv's, or python3. None
/// (the test returns early) only with DBWARD_SKIP_EXTRAS=1; otherwise a missing validator fails.
fn python() -> Option<PathBuf> {
    let venv = Path::new(REPO).join(".venv/bin/python");
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("DBWARD_PYTHON") {
        candidates.push(p.into());
    }
    candidates.push(venv);
    candidates.push("python3".into());
    for py in candidates {
        let ok = Command::new(&py)
            .args(["-c", "import kubernetes_validate, yaml"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(py);
        }
    }
    if std::env::var("DBWARD_SKIP_EXTRAS").as_deref() == Ok("1") {
        eprintln!("kubernetes-validate is not installed: skipped (DBWARD_SKIP_EXTRAS=1)");
        return None;
    }
    panic!(
        "kubernetes-validate is not installed: scripts/test installs it into .venv \
         (or set DBWARD_SKIP_EXTRAS=1 to skip)"
    );
}

/// Every .yaml file in deploy/kubernetes, by name.
fn manifest_files() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(k8s_dir())
        .expect("deploy/kubernetes")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    names.sort();
    assert!(names.len() >= 5, "deploy/kubernetes has too few manifests: {names:?}");
    names
}

/// The YAML documents of `file` as JSON (PyYAML's safe loader, the same the validator uses).
fn docs(py: &Path, file: &Path) -> Vec<Value> {
    let out = Command::new(py)
        .args([
            "-c",
            "import json, sys, yaml\n\
             print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
        ])
        .arg(file)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}: not YAML: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("JSON from python") {
        Value::Array(v) => v,
        other => panic!("{other}"),
    }
}

/// Every document of every manifest.
fn all_docs(py: &Path) -> Vec<(String, Value)> {
    manifest_files()
        .into_iter()
        .flat_map(|f| docs(py, &k8s_dir().join(&f)).into_iter().map(move |d| (f.clone(), d)))
        .collect()
}

fn one<'a>(all: &'a [(String, Value)], kind: &str) -> &'a Value {
    let found: Vec<&Value> = all.iter().map(|(_, d)| d).filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

/// Runs the validator: (exit code, stdout + stderr).
fn kubernetes_validate(py: &Path, version: &str, file: &Path) -> (i32, String) {
    let out = Command::new(py)
        .args(["-m", "kubernetes_validate", "--strict", "-k", version])
        .arg(file)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The ConfigMap's dbward.toml, as text.
fn config_text(all: &[(String, Value)]) -> String {
    let cm = one(all, "ConfigMap");
    cm["data"]["dbward.toml"]
        .as_str()
        .expect("ConfigMap data has dbward.toml")
        .to_string()
}

fn config(all: &[(String, Value)]) -> toml::Value {
    toml::from_str(&config_text(all)).expect("dbward.toml is TOML")
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// Every pod template: the Deployment's and the Job's, by kind.
fn pod_specs(all: &[(String, Value)]) -> Vec<(String, &Value)> {
    let specs: Vec<(String, &Value)> = all
        .iter()
        .filter(|(_, d)| d["kind"] == "Deployment" || d["kind"] == "Job")
        .map(|(_, d)| (s(&d["kind"]).to_string(), &d["spec"]["template"]))
        .collect();
    let kinds: BTreeSet<&str> = specs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["Deployment", "Job"]),
        "a Deployment and a Job example"
    );
    specs
}

fn volume<'a>(spec: &'a Value, name: &str) -> &'a Value {
    list(&spec["volumes"])
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name:?}"))
}

/// The volume mounted in `container` at the directory holding `path`, and the path below it.
fn mount_of<'a>(spec: &'a Value, container: &Value, path: &str) -> (&'a Value, String) {
    let (dir, file) = path.rsplit_once('/').expect("absolute path");
    let m = list(&container["volumeMounts"])
        .iter()
        .find(|m| s(&m["mountPath"]).trim_end_matches('/') == dir)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {dir} (for {path})", container["name"]));
    (volume(spec, s(&m["name"])), file.to_string())
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("host:port")
}

// ---------------------------------------------------------------------------------------------

#[test]
fn every_manifest_validates_strictly_against_kubernetes_1_29_and_1_31() {
    let Some(py) = python() else { return };
    for file in manifest_files() {
        if NOT_CORE.contains(&file.as_str()) {
            continue;
        }
        let path = k8s_dir().join(&file);
        let n = docs(&py, &path).len();
        for version in VERSIONS {
            let (code, out) = kubernetes_validate(&py, version, &path);
            assert_eq!(code, 0, "{file} against {version}:\n{out}");
            // A kind or apiVersion the schemas do not know is only a warning to the tool: here
            // it is a failure (a misspelt apiVersion would otherwise pass unchecked).
            assert!(
                !out.contains("Couldn't find schema"),
                "{file} against {version}:\n{out}"
            );
            assert_eq!(
                out.matches(" passed for resource ").count(),
                n,
                "{file} against {version}:\n{out}"
            );
        }
    }
}

/// The validator really rejects: the Deployment with one unknown field fails, for both versions.
#[test]
fn the_validator_rejects_an_unknown_field() {
    let Some(py) = python() else { return };
    let mut deployment = docs(&py, &k8s_dir().join("deployment.yaml")).remove(0);
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = json!("Always");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    fs::write(&bad, serde_json::to_string_pretty(&deployment).unwrap()).unwrap();
    for version in VERSIONS {
        let (code, out) = kubernetes_validate(&py, version, &bad);
        assert_eq!(code, 1, "{version}: {out}");
        assert!(out.contains("restartPolicyy"), "{version}: {out}");
    }
}

#[test]
fn the_configmap_config_passes_dbward_validate() {
    let Some(py) = python() else { return };
    let all = all_docs(&py);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dbward.toml");
    fs::write(&file, config_text(&all)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dbward"))
        .args(["validate", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dbward validate: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And the same binary refuses a broken copy, so the pass above means something.
    fs::write(
        &file,
        config_text(&all).replace("kind = \"database\"", "kind = \"kvv\""),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dbward"))
        .args(["validate", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
}

/// dbward is a native sidecar whose probes, config mount, token mount and socket volume are the
/// ones the ConfigMap's config names, in the Deployment and in the Job.
#[test]
fn pod_templates_match_the_config() {
    let Some(py) = python() else { return };
    let all = all_docs(&py);
    let cfg = config(&all);
    let cm_name = s(&one(&all, "ConfigMap")["metadata"]["name"]).to_string();
    let admin = cfg["admin"]["listen"].as_str().expect("[admin] listen is set");
    let admin_port = port_of(admin);
    // The kubelet probes the pod IP: a loopback admin listener would never pass a probe.
    let admin_host = admin.rsplit_once(':').unwrap().0.trim_matches(['[', ']']);
    assert!(
        matches!(admin_host, "0.0.0.0" | "::"),
        "[admin] listen = {admin:?}: the kubelet's probes reach the pod IP, not its loopback"
    );
    let token_file = cfg["vault"]["auth"]["token_file"].as_str().expect("token_file");
    let sockets: Vec<&str> = cfg["databases"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| d["listen"].as_array().unwrap())
        .filter_map(|l| l.as_str().filter(|l| l.starts_with('/')))
        .collect();
    assert!(!sockets.is_empty(), "the recommended form is a Unix socket listener");

    for (kind, template) in pod_specs(&all) {
        let spec = &template["spec"];
        let sidecars: Vec<&Value> = list(&spec["initContainers"])
            .iter()
            .filter(|c| c["name"] == "dbward")
            .collect();
        assert_eq!(sidecars.len(), 1, "{kind}: dbward in initContainers");
        let dbward = sidecars[0];
        assert_eq!(dbward["restartPolicy"], "Always", "{kind}: a native sidecar");
        assert_eq!(
            spec["serviceAccountName"],
            s(&one(&all, "ServiceAccount")["metadata"]["name"])
        );

        // --config names dbward.toml in the ConfigMap's volume.
        let args: Vec<&str> = list(&dbward["args"]).iter().map(s).collect();
        let cfg_path = args
            .windows(2)
            .find(|w| w[0] == "--config")
            .map(|w| w[1])
            .unwrap_or_else(|| panic!("{kind}: dbward args {args:?} have no --config"));
        assert_eq!(args.first(), Some(&"run"), "{kind}: {args:?}");
        let (vol, key) = mount_of(spec, dbward, cfg_path);
        assert_eq!(vol["configMap"]["name"], cm_name.as_str(), "{kind}: {cfg_path}");
        assert_eq!(key, "dbward.toml", "{kind}");

        // Probes: the right path each, on the admin listener's port.
        let ports = list(&dbward["ports"]);
        for (probe, path) in [
            ("startupProbe", "/startupz"),
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
        ] {
            let get = &dbward[probe]["httpGet"];
            assert_eq!(get["path"], path, "{kind}: {probe}");
            let port = match &get["port"] {
                Value::Number(n) => n.as_u64().unwrap(),
                Value::String(name) => ports
                    .iter()
                    .find(|p| p["name"] == name.as_str())
                    .unwrap_or_else(|| panic!("{kind}: {probe} names port {name:?}, not declared"))["containerPort"]
                    .as_u64()
                    .unwrap(),
                other => panic!("{kind}: {probe} port {other}"),
            };
            assert_eq!(
                port,
                u64::from(admin_port),
                "{kind}: {probe} port vs [admin] listen = {admin:?}"
            );
        }

        // The token: a projected service-account token for audience vault, short-lived,
        // mounted exactly where token_file reads it.
        let (vol, file) = mount_of(spec, dbward, token_file);
        let sources = list(&vol["projected"]["sources"]);
        let sat = sources
            .iter()
            .map(|src| &src["serviceAccountToken"])
            .find(|t| t["path"] == file.as_str())
            .unwrap_or_else(|| panic!("{kind}: {token_file} is no projected serviceAccountToken: {vol}"));
        assert_eq!(sat["audience"], "vault", "{kind}");
        let exp = sat["expirationSeconds"].as_u64().expect("expirationSeconds");
        assert!((600..=3600).contains(&exp), "{kind}: expirationSeconds {exp}");

        // The Unix socket's directory: an in-memory emptyDir that every main container mounts.
        for socket in &sockets {
            let (vol, _) = mount_of(spec, dbward, socket);
            assert_eq!(vol["emptyDir"]["medium"], "Memory", "{kind}: {socket}");
            let dir = socket.rsplit_once('/').unwrap().0;
            for c in list(&spec["containers"]) {
                assert!(
                    list(&c["volumeMounts"])
                        .iter()
                        .any(|m| m["name"] == vol["name"] && m["mountPath"] == dir),
                    "{kind}: container {} does not mount {dir}",
                    c["name"]
                );
            }
        }

        // vault.state_file holds the token and passwords: an in-memory emptyDir (never on a
        // disk, kept across container restarts) that no other container mounts.
        if let Some(state) = cfg["vault"].get("state_file").and_then(|v| v.as_str()) {
            let (vol, _) = mount_of(spec, dbward, state);
            assert_eq!(vol["emptyDir"]["medium"], "Memory", "{kind}: {state}");
            for c in list(&spec["containers"]) {
                assert!(
                    !list(&c["volumeMounts"]).iter().any(|m| m["name"] == vol["name"]),
                    "{kind}: container {} mounts dbward's state file",
                    c["name"]
                );
            }
        }

        // Hardening of every container, resources of the sidecar.
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{kind}");
        assert_eq!(spec["automountServiceAccountToken"], false, "{kind}");
        for c in list(&spec["initContainers"]).iter().chain(list(&spec["containers"])) {
            let sc = &c["securityContext"];
            let name = &c["name"];
            assert_eq!(sc["runAsNonRoot"], true, "{kind} {name}");
            assert!(sc["runAsUser"].as_u64().is_some_and(|u| u > 0), "{kind} {name}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{kind} {name}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{kind} {name}");
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{kind} {name}");
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{kind} {name}");
        }
        assert!(dbward["resources"]["requests"]["memory"].is_string(), "{kind}");
        assert!(dbward["resources"]["requests"]["cpu"].is_string(), "{kind}");
        assert!(dbward["resources"]["limits"]["memory"].is_string(), "{kind}");

        if kind == "Job" {
            assert_eq!(spec["restartPolicy"], "Never", "a Job's pod");
        } else {
            let ann = &template["metadata"]["annotations"];
            assert_eq!(ann["prometheus.io/scrape"], "true");
            assert_eq!(ann["prometheus.io/port"], admin_port.to_string().as_str());
            assert_eq!(ann["prometheus.io/path"], "/metrics");
        }
    }
}

/// `kubectl apply -k` applies exactly the core manifests, into the namespace they name, and the
/// image it rewrites is the one the pods use.
#[test]
fn kustomization_lists_every_core_manifest() {
    let Some(py) = python() else { return };
    let k = docs(&py, &k8s_dir().join("kustomization.yaml")).remove(0);
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    let resources: BTreeSet<&str> = list(&k["resources"]).iter().map(s).collect();
    let want: BTreeSet<String> = manifest_files()
        .into_iter()
        .filter(|f| !NOT_CORE.contains(&f.as_str()))
        .collect();
    assert_eq!(resources, want.iter().map(String::as_str).collect());
    let ns = s(&k["namespace"]);
    let all = all_docs(&py);
    for (file, d) in &all {
        if d["kind"] == "Kustomization" {
            continue;
        }
        if d["kind"] == "Namespace" {
            assert_eq!(d["metadata"]["name"], ns, "{file}");
        } else {
            assert_eq!(d["metadata"]["namespace"], ns, "{file}");
        }
    }
    let image = s(&list(&k["images"])[0]["name"]);
    for (kind, t) in pod_specs(&all) {
        let c = list(&t["spec"]["initContainers"])
            .iter()
            .find(|c| c["name"] == "dbward")
            .unwrap();
        assert_eq!(s(&c["image"]).split(':').next(), Some(image), "{kind}");
    }
}

/// The optional PodMonitor selects the Deployment's pods and scrapes the admin port, as job
/// "dbward" (what the alerts expect).
#[test]
fn podmonitor_scrapes_the_admin_port() {
    let Some(py) = python() else { return };
    let all = all_docs(&py);
    let pm = one(&all, "PodMonitor");
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    let deployment = one(&all, "Deployment");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels") {
        assert_eq!(&labels[k], v, "PodMonitor selector {k}");
    }
    let admin_port = port_of(config(&all)["admin"]["listen"].as_str().unwrap());
    let sidecar = list(&deployment["spec"]["template"]["spec"]["initContainers"])
        .iter()
        .find(|c| c["name"] == "dbward")
        .unwrap();
    let endpoints = list(&pm["spec"]["podMetricsEndpoints"]);
    assert_eq!(endpoints.len(), 1);
    let ep = &endpoints[0];
    assert_eq!(ep["path"], "/metrics");
    let port = list(&sidecar["ports"])
        .iter()
        .find(|p| p["name"] == ep["port"])
        .expect("the PodMonitor's port is a named port of dbward");
    assert_eq!(port["containerPort"], admin_port);
    assert!(
        list(&ep["relabelings"])
            .iter()
            .any(|r| r["targetLabel"] == "job" && r["replacement"] == "dbward"),
        "job=\"dbward\" for dashboards/dbward-alerts.yml"
    );
    let allowed: BTreeSet<&str> = ["apiVersion", "kind", "metadata", "spec"].into();
    let keys: BTreeSet<&str> = pm.as_object().unwrap().keys().map(String::as_str).collect();
    assert!(keys.is_subset(&allowed), "{keys:?}");
}
