//! `stack state …`: one thin function per subcommand over the state
//! backends (`crate::state`): pull, push, history, unlock and migrate. The
//! ones that write ask first (or take `--yes`).

use std::process::ExitCode;

use serde_json::json;

use super::args::{FileArgs, MigrateArgs, OutputFormat, PushArgs, StateCommand, UnlockArgs};
use super::outcome::print_document;
use super::{invocation, prompt, view};
use crate::artifacts::Artifacts;
use crate::engine::Cancel;
use crate::model::{self, Stack};
use crate::state::{self, MoveError, Place, StateBackend, StateError, URL_ENV};

#[derive(Debug, thiserror::Error)]
pub enum StateCommandError {
    #[error("stack {stack} has no state at {location} yet")]
    NoState { stack: String, location: String },
}

pub async fn run(
    command: &StateCommand,
    output: OutputFormat,
    cancel: &Cancel,
) -> anyhow::Result<ExitCode> {
    let json = output == OutputFormat::Json;
    match command {
        StateCommand::Pull(args) => pull(args).await,
        StateCommand::Push(args) => push(args, json, cancel).await,
        StateCommand::History(args) => history(args, json).await,
        StateCommand::Unlock(args) => unlock(args, json, cancel).await,
        StateCommand::Migrate(args) => migrate(args, json, cancel).await,
    }
}

/// The stack's backend where the stack keeps its state.
async fn backend_of(stack: &Stack) -> Result<Box<dyn StateBackend>, StateError> {
    let artifacts = Artifacts::new(&stack.state_dir(), &stack.name);
    Place::of(stack).backend(stack, &artifacts).await
}

/// Prints the state (the same with `--output json`: it is JSON).
async fn pull(args: &FileArgs) -> anyhow::Result<ExitCode> {
    let stack = model::load(&args.file)?;
    let backend = backend_of(&stack).await?;
    let state = backend
        .read()
        .await?
        .ok_or_else(|| StateCommandError::NoState {
            stack: stack.name.clone(),
            location: backend.location(),
        })?;
    print_document(
        &serde_json::to_value(&state).expect("a state serialises"),
        false,
    );
    Ok(ExitCode::SUCCESS)
}

async fn push(args: &PushArgs, json: bool, cancel: &Cancel) -> anyhow::Result<ExitCode> {
    let (file, path) = args.stack_and_state();
    let stack = model::load(&file)?;
    let pushed = state::read_state_file(&path)?;
    let backend = backend_of(&stack).await?;
    let question = format!(
        "Write {} as the next serial of the state of stack {} at {}?",
        path.display(),
        stack.name,
        backend.location()
    );
    prompt::confirm(args.yes, json, &question, "write it", cancel).await?;
    let serial = state::push(
        &stack,
        backend.as_ref(),
        &path,
        pushed,
        args.force,
        &invocation::holder(),
        args.lock.lock_timeout,
    )
    .await?;
    match json {
        true => print_document(
            &json!({"pushed": path, "serial": serial, "location": backend.location()}),
            false,
        ),
        false => println!(
            "wrote {} as serial {serial} of the state of stack {} ({})",
            path.display(),
            stack.name,
            backend.location()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

async fn history(args: &FileArgs, json: bool) -> anyhow::Result<ExitCode> {
    let stack = model::load(&args.file)?;
    let backend = backend_of(&stack).await?;
    let entries = backend.history().await?;
    match json {
        true => print_document(
            &serde_json::to_value(&entries).expect("the history serialises"),
            false,
        ),
        false => print!("{}", view::history(&entries)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn unlock(args: &UnlockArgs, json: bool, cancel: &Cancel) -> anyhow::Result<ExitCode> {
    let stack = model::load(&args.file.file)?;
    let backend = backend_of(&stack).await?;
    let location = backend.location();
    let Some(holder) = backend.holder().await? else {
        match json {
            true => print_document(&json!({"location": location, "holder": null}), false),
            false => println!("the lock of {location} is free"),
        }
        return Ok(ExitCode::SUCCESS);
    };
    let named = format!(
        "pid {} on {} since {} (`{}`)",
        holder.pid,
        holder.who(),
        holder.started,
        holder.command
    );
    let local = Place::of(&stack) == Place::Local;
    if !args.force {
        let next = match local {
            true => "a local lock goes with its process: it is free once that process ends",
            false => "`stack state unlock --force` ends that run's hold on it",
        };
        match json {
            true => print_document(&json!({"location": location, "holder": holder}), false),
            false => println!("the lock of {location} is held by {named}\n{next}"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !local {
        let question = format!(
            "End the database session of {named}, so that the lock of stack {} is free? That run can write nothing more.",
            stack.name
        );
        prompt::confirm(args.yes, json, &question, "end it", cancel).await?;
    }
    backend.unlock(&holder).await?;
    match json {
        true => print_document(
            &json!({"location": location, "holder": holder, "ended": true}),
            false,
        ),
        false => println!(
            "ended the hold of {named}: the lock of stack {} is free",
            stack.name
        ),
    }
    Ok(ExitCode::SUCCESS)
}

async fn migrate(args: &MigrateArgs, json: bool, cancel: &Cancel) -> anyhow::Result<ExitCode> {
    let stack = model::load(&args.file.file)?;
    let to_place = Place::parse(&args.to)?;
    let artifacts = Artifacts::new(&stack.state_dir(), &stack.name);
    let from = Place::of(&stack).backend(&stack, &artifacts).await?;
    let to = to_place.backend(&stack, &artifacts).await?;
    if from.location() == to.location() {
        return Err(MoveError::Same(stack.name.clone()).into());
    }
    let question = format!(
        "Move the state of stack {} and its artifacts from {} to {}? The original is removed once the copy is checked.",
        stack.name,
        from.location(),
        to.location()
    );
    prompt::confirm(args.yes, json, &question, "move it", cancel).await?;
    let moved = state::migrate(
        &stack,
        from.as_ref(),
        to.as_ref(),
        &invocation::holder(),
        args.lock.lock_timeout,
    )
    .await?;
    let file = args.file.file.display();
    let next = match &to_place {
        Place::Local => format!(
            "from now on, run the stack without {URL_ENV} and without a postgres `state:` in {file}"
        ),
        Place::Postgres { url, .. } => format!(
            "from now on, run the stack with `state: {{backend: postgres, url: {url}}}` in {file}, or {URL_ENV}={url}"
        ),
    };
    match json {
        true => print_document(&json!({"moved": moved, "next": next}), false),
        false => println!(
            "moved the state of stack {} (serial {}, {} resources; artifacts: {}) from {} to {}\n{next}",
            stack.name,
            moved.serial,
            moved.resources,
            if moved.artifacts.is_empty() {
                "none".to_string()
            } else {
                moved.artifacts.join(", ")
            },
            moved.from,
            moved.to
        ),
    }
    Ok(ExitCode::SUCCESS)
}
