//! Shell completions and man pages come from the same clap definitions as the commands.

use std::process::Command;

fn isla() -> Command {
    Command::new(env!("CARGO_BIN_EXE_isla"))
}

#[test]
fn completions_for_each_shell_and_an_unknown_one() {
    for (shell, marker) in [("bash", "_isla()"), ("zsh", "#compdef isla"), ("fish", "complete -c isla")] {
        let o = isla().args(["completions", shell]).output().unwrap();
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && script.contains(marker), "{shell}: {script:.200}");
        assert!(script.contains("compose") && script.contains("balloon"), "{shell}: subcommands are completed");
    }
    let o = isla().args(["completions", "cmd.exe"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cmd.exe"));
}

#[test]
fn man_pages_for_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let o = isla().args(["man", "--out"]).arg(dir.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for page in ["isla.1", "isla-vm-run.1", "isla-compose-up.1", "isla-run.1", "isla-lab.1"] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is a man page");
    }
    let run = std::fs::read_to_string(dir.path().join("isla-vm-run.1")).unwrap();
    assert!(run.contains("isla\\-vm\\-run") && run.contains("api\\-sock"), "{run:.400}");
}
