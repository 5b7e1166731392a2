//! `epm-helper`: the per-user EPM helper. One runs in each user's session
//! (a LaunchAgent on macOS, a desktop autostart or user service on Linux).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use epm_helper::prompt::{Osascript, Zenity};
use epm_helper::session::Session;
use epm_prompt::{Backend, PromptError, Scripted, Terminal, Tone};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    /// The best this session has: osascript on macOS; zenity on a Linux
    /// desktop; else the terminal.
    Auto,
    /// macOS dialogs through osascript.
    Osascript,
    /// GTK dialogs through zenity.
    Zenity,
    /// Questions on the controlling terminal.
    Terminal,
    /// Answers from --answers FILE (tests, unattended runs).
    Scripted,
}

#[derive(Debug, Parser)]
#[command(
    name = "epm-helper",
    version,
    about = "The EPM per-user helper: asks for justifications and approval windows, shows why a program was blocked and when it may run",
    after_help = "It registers with epmd for the user it runs as (the daemon checks the uid \
        the kernel reports) and shows only that user's prompts.\n\n\
        Examples:\n  epm-helper\n  epm-helper --backend terminal\n  \
        epm-helper --backend scripted --answers answers.json --transcript shown.txt\n\n\
        An answers file is JSON: {\"answers\": [\"Debugging ticket 42\", \"now\", \"+2h\", null]}; \
        each entry answers the next question, null cancels it."
)]
struct Cli {
    /// Talk to the daemon over this control socket [default: on macOS the
    /// XPC service com.epm.epmd.xpc, elsewhere /var/run/epm/epmd.sock].
    #[arg(long, value_name = "PATH", env = "EPM_SOCKET")]
    socket: Option<PathBuf>,
    /// How to ask and tell.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// The answers for --backend scripted.
    #[arg(long, value_name = "FILE", required_if_eq("backend", "scripted"))]
    answers: Option<PathBuf>,
    /// Also append everything shown (questions and messages) to FILE.
    #[arg(long, value_name = "FILE")]
    transcript: Option<PathBuf>,
    /// Exit when epmd closes the connection instead of reconnecting.
    #[arg(long)]
    once: bool,
}

/// Writes every question and message to a file, then asks the real backend.
struct Recording {
    inner: Box<dyn Backend>,
    file: std::fs::File,
}

impl Recording {
    fn record(&mut self, line: &str) {
        use std::io::Write;
        let _ = writeln!(self.file, "{}", line.replace('\n', "\\n"));
        let _ = self.file.flush();
    }
}

impl Backend for Recording {
    fn entry(
        &mut self,
        title: &str,
        text: &str,
        choices: &[String],
        default: &str,
    ) -> Result<Option<String>, PromptError> {
        self.record(&format!("ask: {text}"));
        let answer = self.inner.entry(title, text, choices, default)?;
        self.record(&format!("answer: {answer:?}"));
        Ok(answer)
    }

    fn message(&mut self, title: &str, text: &str, tone: Tone) -> Result<(), PromptError> {
        self.record(&format!("message: {text}"));
        self.inner.message(title, text, tone)
    }

    fn notify(&mut self, title: &str, text: &str, tone: Tone) -> Result<(), PromptError> {
        self.record(&format!("message: {text}"));
        self.inner.notify(title, text, tone)
    }
}

fn backend(cli: &Cli) -> Result<Box<dyn Backend>, String> {
    let choice = match cli.backend {
        BackendChoice::Auto if cfg!(target_os = "macos") => BackendChoice::Osascript,
        BackendChoice::Auto if Zenity::detect().is_some() => BackendChoice::Zenity,
        BackendChoice::Auto => BackendChoice::Terminal,
        other => other,
    };
    Ok(match choice {
        BackendChoice::Osascript => Box::new(Osascript),
        BackendChoice::Zenity => {
            Box::new(Zenity::detect().ok_or(
                "zenity is not installed or there is no display (DISPLAY / WAYLAND_DISPLAY)",
            )?)
        }
        BackendChoice::Terminal => Box::new(
            Terminal::open_tty()
                .map_err(|e| format!("no terminal to ask on ({e}); try --backend zenity"))?,
        ),
        BackendChoice::Scripted => {
            let path = cli
                .answers
                .as_deref()
                .ok_or("--backend scripted needs --answers FILE")?;
            Box::new(Scripted::from_file(path).map_err(|e| e.to_string())?)
        }
        BackendChoice::Auto => return Err("no prompt backend".into()),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut backend = match backend(&cli) {
        Ok(backend) => backend,
        Err(message) => {
            eprintln!("epm-helper: {message}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &cli.transcript {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(file) => {
                backend = Box::new(Recording {
                    inner: backend,
                    file,
                })
            }
            Err(e) => {
                eprintln!("epm-helper: cannot write {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    let session = Session {
        endpoint: epm_ipc::Endpoint::socket_or_default(cli.socket),
        once: cli.once,
    };
    match session.run(backend.as_mut()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("epm-helper: {error}");
            ExitCode::from(1)
        }
    }
}
