//! `agentry config show` prints the effective configuration, each value with where it came
//! from (the default, `agentry.toml`, an `AGENTRY_*` variable or a flag), secrets redacted;
//! `agentry config check` validates it without serving.

use clap::{Args, Subcommand};

use crate::flags::ServeFlags;

#[derive(Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print every setting, its value and its source.
    Show {
        #[command(flatten)]
        flags: ServeFlags,
        /// Print JSON: `{"key": {"value", "source"}}`.
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration (file, environment and flags) without serving.
    Check {
        #[command(flatten)]
        flags: ServeFlags,
    },
    /// Print the settings table of docs/configuration.md (generated from the settings).
    Docs,
}

pub fn config(args: ConfigArgs) -> anyhow::Result<()> {
    match args.command {
        ConfigCommand::Show { flags, json } => {
            let loaded = flags.load()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&loaded.show())?);
            } else {
                print!("{}", loaded.show_text());
            }
        }
        ConfigCommand::Check { flags } => {
            let loaded = flags.load()?;
            match &loaded.file {
                Some(f) => println!("configuration ok ({})", f.display()),
                None => println!("configuration ok (no configuration file)"),
            }
        }
        ConfigCommand::Docs => print!("{}", agentry_server::config::settings_table()),
    }
    Ok(())
}
