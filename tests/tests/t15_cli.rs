//! t15: the `herald` command line as BRIEF §5 specifies it (the README walkthrough).

use std::process::Output;

use herald_tests::DevNode;

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output) -> anyhow::Result<String> {
    anyhow::ensure!(
        out.status.success(),
        "command failed: {}\nstdout: {}",
        stderr(&out),
        stdout(&out)
    );
    Ok(stdout(&out))
}

#[test]
fn walkthrough_token_create_pub_sub_history() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let svc = node.service_token("cli")?;
    let out = ok(node
        .cli(&svc)?
        .args([
            "conv",
            "create",
            "--id",
            "1",
            "--kind",
            "group",
            "--members",
            "1,2,3",
        ])
        .output()?)?;
    assert!(out.contains("created"), "{out}");
    let out = ok(node
        .cli(&svc)?
        .args([
            "conv",
            "create",
            "--id",
            "1",
            "--kind",
            "group",
            "--members",
            "1,2,3",
        ])
        .output()?)?;
    assert!(out.contains("already exists"), "{out}");

    assert_eq!(
        ok(node
            .cli(&svc)?
            .args(["pub", "--conv", "1", "--count", "3", "hello"])
            .output()?)?,
        "1\n2\n3\n"
    );
    assert_eq!(
        ok(node
            .cli(&svc)?
            .args(["pub", "--conv", "1", "--key", "pay-42", "paid"])
            .output()?)?,
        "4\n"
    );
    // A retry with the same key: the original seq, nothing appended.
    assert_eq!(
        ok(node
            .cli(&svc)?
            .args(["pub", "--conv", "1", "--key", "pay-42", "paid"])
            .output()?)?,
        "4\n"
    );

    let user = node.user_token(2)?;
    let out = ok(node
        .cli(&user)?
        .args([
            "sub", "--conv", "1", "--from", "1", "--count", "4", "--json",
        ])
        .output()?)?;
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 4, "{out}");
    let payloads: Vec<&str> = lines.iter().filter_map(|l| l["payload"].as_str()).collect();
    assert_eq!(payloads, ["hello #1", "hello #2", "hello #3", "paid"]);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["conv"], 1);
        assert_eq!(line["seq"], i as u64 + 1);
        assert_eq!(line["sender"], "service:cli");
    }

    let out = ok(node
        .cli(&user)?
        .args([
            "history", "--conv", "1", "--from", "2", "--limit", "2", "--json",
        ])
        .output()?)?;
    let seqs: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).map(|v| v["seq"].as_u64().unwrap_or(0))
        })
        .collect::<Result<_, _>>()?;
    assert_eq!(seqs, [2, 3]);
    Ok(())
}

#[test]
fn refusals_exit_non_zero_with_the_reason() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let svc = node.service_token("cli")?;
    ok(node
        .cli(&svc)?
        .args([
            "conv",
            "create",
            "--id",
            "1",
            "--kind",
            "group",
            "--members",
            "1",
        ])
        .output()?)?;

    let outsider = node.user_token(9)?;
    let out = node
        .cli(&outsider)?
        .args(["sub", "--conv", "1", "--count", "1"])
        .output()?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a member"), "{}", stderr(&out));

    let out = node
        .cli(&outsider)?
        .args(["conv", "create", "--id", "2", "--kind", "group"])
        .output()?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not allowed for this role"),
        "{}",
        stderr(&out)
    );

    let out = node
        .cli("forged.token.here")?
        .args(["pub", "--conv", "1", "x"])
        .output()?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("malformed token"), "{}", stderr(&out));

    let out = node
        .cli(&svc)?
        .env_remove("HERALD_TOKEN")
        .args(["pub", "--conv", "1", "x"])
        .output()?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no token"), "{}", stderr(&out));

    let out = node
        .cli(&svc)?
        .args([
            "conv",
            "create",
            "--id",
            "3",
            "--kind",
            "direct",
            "--members",
            "1,2,3",
        ])
        .output()?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("invalid request"), "{}", stderr(&out));

    // After membership is granted, the same user may subscribe.
    ok(node
        .cli(&svc)?
        .args(["conv", "add-members", "--id", "1", "--members", "9"])
        .output()?)?;
    ok(node
        .cli(&svc)?
        .args(["pub", "--conv", "1", "welcome"])
        .output()?)?;
    let out = ok(node
        .cli(&outsider)?
        .args([
            "sub", "--conv", "1", "--from", "1", "--count", "1", "--json",
        ])
        .output()?)?;
    assert!(out.contains("welcome"), "{out}");
    Ok(())
}

#[test]
fn defaultconfig_round_trips_through_checkconfig() -> anyhow::Result<()> {
    let node = DevNode::start()?;
    let defaults = ok(node.cli("")?.arg("defaultconfig").output()?)?;
    let dir = tempfile::tempdir()?;
    let dev = node.dir.path().join("dev");
    let config = defaults
        .replace("herald-data/dev", &dev.display().to_string())
        .replace(
            "payload_bytes_max = 65536",
            "payload_bytes_max = 65536\nno_such_key = 1",
        );
    let path = dir.path().join("node.toml");
    std::fs::write(&path, config)?;
    let out = node
        .cli("")?
        .args(["checkconfig", "--config"])
        .arg(&path)
        .output()?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no_such_key"),
        "unknown keys are warned: {}",
        stderr(&out)
    );

    std::fs::write(&path, "[limits]\npayload_bytes_max = 0\n")?;
    let out = node
        .cli("")?
        .args(["checkconfig", "--config"])
        .arg(&path)
        .output()?;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("payload_bytes_max") && err.contains("tls.cert_file"),
        "every problem is listed: {err}"
    );
    Ok(())
}
