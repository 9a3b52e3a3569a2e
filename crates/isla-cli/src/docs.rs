//! `isla completions SHELL` and `isla man --out DIR`: shell completions (clap_complete) and man
//! pages (clap_mangen) generated from the same clap definitions the commands parse with.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};

#[derive(Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    shell: clap_complete::Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// Directory for isla.1 and one page per subcommand (isla-vm-run.1, ...).
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

/// Prints the completion script for the shell.
pub fn completions(a: &CompletionsArgs) -> Result<()> {
    use std::io::Write;
    let mut cmd = crate::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "isla", &mut script);
    match std::io::stdout().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing the completion script"),
        _ => Ok(()),
    }
}

/// Writes the man pages; prints how many.
pub fn man(a: &ManArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let cmd = crate::Cli::command();
    let n = write_pages(&cmd, "isla", &a.out)?;
    println!("{n} man pages in {}", a.out.display());
    Ok(())
}

fn write_pages(cmd: &clap::Command, name: &str, dir: &Path) -> Result<usize> {
    let mut out = Vec::new();
    let page = cmd.clone().display_name(name).bin_name(name.replace('-', " "));
    clap_mangen::Man::new(page).title(name.to_uppercase()).render(&mut out)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        n += write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n)
}
