use super::*;

const MINIMAL: &str = r#"
        [clusters.demo]
        primary = "127.0.0.1:5441"
        replicas = ["127.0.0.1:5442", "127.0.0.1:5443"]

        [[listeners]]
        listen = "127.0.0.1:6432"
        cluster = "demo"
        role = "primary"
    "#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("proxy.toml"))
}

#[test]
fn minimal_config_gets_defaults() {
    let config = parse(MINIMAL).expect("valid");
    assert_eq!(config.limits.max_client_connections, 10_000);
    assert_eq!(config.limits.hold_timeout.get().as_secs(), 30);
    assert_eq!(config.admin.listen, "127.0.0.1:9432");
    assert_eq!(config.listeners[0].role, ListenerRole::Primary);
}

#[test]
fn unknown_key_is_named_with_its_path() {
    let text = format!("{MINIMAL}\n[limits]\nmax_clients = 3\n");
    let err = parse(&text).expect_err("unknown key");
    assert_eq!(err.key, "limits.max_clients");
    assert!(err.message.contains("max_clients"), "{err}");
    assert!(err.to_string().starts_with("proxy.toml: "), "{err}");
}

#[test]
fn bad_duration_names_the_key() {
    let text = format!("{MINIMAL}\n[limits]\nhold_timeout = \"ten seconds\"\n");
    let err = parse(&text).expect_err("bad duration");
    assert_eq!(err.key, "limits.hold_timeout");
}

#[test]
fn bad_role_names_the_listener() {
    let text = MINIMAL.replace("role = \"primary\"", "role = \"writer\"");
    let err = parse(&text).expect_err("bad role");
    assert_eq!(err.key, "listeners[0].role");
}

#[test]
fn listener_must_name_a_known_cluster() {
    let text = MINIMAL.replace("cluster = \"demo\"", "cluster = \"nope\"");
    let err = parse(&text).expect_err("unknown cluster");
    assert_eq!(err.key, "listeners[0].cluster");
}

#[test]
fn bad_member_address_names_its_index() {
    let text = MINIMAL.replace("127.0.0.1:5443", "localhost");
    let err = parse(&text).expect_err("bad address");
    assert_eq!(err.key, "clusters.demo.replicas[1]");
}

#[test]
fn syntax_error_gives_a_line() {
    let err = parse("[limits\n").expect_err("syntax");
    assert_eq!(err.key, "(syntax)");
    assert!(err.message.contains("line 1"), "{err}");
}

#[test]
fn duplicate_listen_address_is_refused() {
    let text = format!(
            "{MINIMAL}\n[[listeners]]\nlisten = \"127.0.0.1:6432\"\ncluster = \"demo\"\nrole = \"replica\"\n"
        );
    let err = parse(&text).expect_err("duplicate");
    assert_eq!(err.key, "listeners[1].listen");
}

#[test]
fn patroni_cluster_defaults() {
    let text = MINIMAL.replace(
        "primary = \"127.0.0.1:5441\"\n        replicas = [\"127.0.0.1:5442\", \"127.0.0.1:5443\"]",
        "etcd = [\"http://127.0.0.1:2379\"]",
    );
    let config = parse(&text).expect("valid");
    let cluster = &config.clusters["demo"];
    assert!(!cluster.is_static());
    assert_eq!(
        cluster.effective_leader_policy(),
        LeaderPolicy::EtcdAndPatroni
    );
    assert_eq!(cluster.namespace, "/service/");
    assert_eq!(cluster.on_etcd_loss, EtcdLossPolicy::Patroni);
}

#[test]
fn static_and_patroni_keys_do_not_mix() {
    let text = MINIMAL.replace(
        "replicas = [",
        "etcd = [\"http://127.0.0.1:2379\"]\n        replicas = [",
    );
    let err = parse(&text).expect_err("mixed");
    assert_eq!(err.key, "clusters.demo.primary");
}

#[test]
fn etcd_policy_needs_etcd() {
    let text = MINIMAL.replace(
        "primary = \"127.0.0.1:5441\"\n        replicas = [\"127.0.0.1:5442\", \"127.0.0.1:5443\"]",
        "patroni = [\"http://127.0.0.1:8041\"]\n        leader_policy = \"etcd\"",
    );
    let err = parse(&text).expect_err("etcd policy without etcd");
    assert_eq!(err.key, "clusters.demo.leader_policy");
    let text = text.replace("leader_policy = \"etcd\"", "leader_policy = \"raft\"");
    let err = parse(&text).expect_err("unknown policy");
    assert_eq!(err.key, "clusters.demo.leader_policy");
}

#[test]
fn bad_etcd_url_names_its_index() {
    let text = MINIMAL.replace(
        "primary = \"127.0.0.1:5441\"\n        replicas = [\"127.0.0.1:5442\", \"127.0.0.1:5443\"]",
        "etcd = [\"http://127.0.0.1:2379\", \"127.0.0.1:2379\"]",
    );
    let err = parse(&text).expect_err("bad url");
    assert_eq!(err.key, "clusters.demo.etcd[1]");
}

#[test]
fn host_port_forms() {
    assert_eq!(
        parse_host_port("db.example:5432"),
        Ok(("db.example".to_owned(), 5432))
    );
    assert_eq!(parse_host_port("[::1]:5432"), Ok(("::1".to_owned(), 5432)));
    assert!(parse_host_port(":5432").is_err());
    assert!(parse_host_port("host:0").is_err());
    assert!(parse_host_port("host:99999").is_err());
}

#[test]
fn fleet_etcd_keys_are_checked_as_a_cluster_s() {
    let fleet = |extra: &str| {
        format!(
            "{MINIMAL}\n[fleet]\nlisten = \"127.0.0.1:6440\"\netcd = [\"http://127.0.0.1:2379\"]\n{extra}"
        )
    };
    parse(&fleet("")).expect("a fleet found through etcd");
    for (extra, key) in [
        ("etcd_cert = \"/nonexistent/cert.pem\"\n", "fleet.etcd_cert"),
        ("etcd_user = \"u\"\n", "fleet.etcd_user"),
        ("id = 3\n", "fleet.id"),
    ] {
        let err = parse(&fleet(extra)).expect_err(extra);
        assert_eq!(err.key, key, "{err}");
    }
}

#[test]
fn etcd_tls_keys_with_an_http_endpoint_are_refused() {
    let dir = std::env::temp_dir().join(format!("rolegate-config-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, "not read by the check").expect("ca");
    let cluster = |scheme: &str| {
        format!(
            r#"
            [clusters.demo]
            scope = "demo"
            etcd = ["https://127.0.0.1:2379", "{scheme}://127.0.0.1:2380"]
            etcd_ca = "{}"

            [[listeners]]
            listen = "127.0.0.1:6432"
            cluster = "demo"
            role = "primary"
            "#,
            ca.display()
        )
    };
    parse(&cluster("https")).expect("TLS with https:// endpoints");
    let err = parse(&cluster("http")).expect_err("TLS with an http:// endpoint");
    assert_eq!(err.key, "clusters.demo.etcd_ca", "{err}");
    assert!(err.message.contains("etcd[1]"), "{err}");
    assert!(err.to_string().starts_with("proxy.toml: "), "{err}");

    let fleet = format!(
        "{MINIMAL}\n[fleet]\nlisten = \"127.0.0.1:6440\"\netcd = [\"http://127.0.0.1:2379\"]\netcd_ca = \"{}\"\n",
        ca.display()
    );
    let err = parse(&fleet).expect_err("fleet TLS with an http:// endpoint");
    assert_eq!(err.key, "fleet.etcd_ca", "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pooling_keys_are_checked_together() {
    let pooled = |keys: &str| format!("{MINIMAL}{keys}\n");
    let config = parse(&pooled(
        "pool_mode = \"session\"\nauth_file = \"users.txt\"",
    ))
    .expect("valid");
    let listener = &config.listeners[0];
    assert_eq!(listener.pool_mode, Some(PoolMode::Session));
    assert_eq!(listener.pool_size, 20);
    assert_eq!(listener.server_reset_query, "DISCARD ALL");
    let cases = [
        (
            "pool_mode = \"session\"",
            "listeners[0].auth_file",
            "name the file",
        ),
        (
            "auth_file = \"users.txt\"",
            "listeners[0].auth_file",
            "only a pooled listener",
        ),
        (
            "pool_mode = \"session\"\nauth_file = \"u\"\npool_size = 0",
            "listeners[0].pool_size",
            "out of range",
        ),
        (
            "pool_mode = \"statement\"\nauth_file = \"u\"",
            "listeners[0].pool_mode",
            "statement",
        ),
    ];
    for (keys, key, words) in cases {
        let err = parse(&pooled(keys)).expect_err(keys);
        assert_eq!(err.key, key, "{keys}: {err}");
        assert!(err.message.contains(words), "{keys}: {err}");
    }
}
