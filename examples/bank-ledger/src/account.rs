//! The domain: an account's events, its state rebuilt from them, and the decisions of commands.
//! Pure: no store, no IO.

use orchestrator_serde::DomainEvent;
use serde::{Deserialize, Serialize};

/// What can happen to an account. Stored as JSON with its variant in `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum AccountEvent {
    /// The account was opened.
    Opened {
        /// Who owns it.
        owner: String,
    },
    /// Money came in, in cents.
    Deposited {
        /// Amount in cents.
        amount: i64,
    },
    /// Money went out, in cents.
    Withdrawn {
        /// Amount in cents.
        amount: i64,
    },
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            AccountEvent::Opened { .. } => "AccountOpened",
            AccountEvent::Deposited { .. } => "MoneyDeposited",
            AccountEvent::Withdrawn { .. } => "MoneyWithdrawn",
        }
    }
}

impl AccountEvent {
    /// How the event changes the balance.
    pub fn balance_change(&self) -> i64 {
        match self {
            AccountEvent::Opened { .. } => 0,
            AccountEvent::Deposited { amount } => *amount,
            AccountEvent::Withdrawn { amount } => -amount,
        }
    }
}

/// An account as its events left it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Account {
    /// Whether it was opened.
    pub open: bool,
    /// Balance in cents.
    pub balance: i64,
    /// The stream's version: how many events it has.
    pub version: u64,
}

impl Account {
    /// Folds one event into the state.
    pub fn apply(&mut self, event: &AccountEvent) {
        if let AccountEvent::Opened { .. } = event {
            self.open = true;
        }
        self.balance += event.balance_change();
        self.version += 1;
    }
}

/// A command to an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Open the account.
    Open {
        /// Who owns it.
        owner: String,
    },
    /// Put money in.
    Deposit {
        /// Amount in cents.
        amount: i64,
    },
    /// Take money out; never below zero.
    Withdraw {
        /// Amount in cents.
        amount: i64,
    },
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Opening an account that exists.
    #[error("the account is already open")]
    AlreadyOpen,
    /// Using an account that was never opened.
    #[error("the account is not open")]
    NotOpen,
    /// A zero or negative amount.
    #[error("the amount must be positive")]
    BadAmount,
    /// Withdrawing more than the balance.
    #[error("not enough money: the balance is {balance}")]
    Overdraft {
        /// The balance at the time.
        balance: i64,
    },
}

/// Decides what a command does to `account`: the events to append, or why not.
pub fn decide(account: &Account, command: &Command) -> Result<Vec<AccountEvent>, Refused> {
    match command {
        Command::Open { .. } if account.open => Err(Refused::AlreadyOpen),
        Command::Open { owner } => Ok(vec![AccountEvent::Opened { owner: owner.clone() }]),
        _ if !account.open => Err(Refused::NotOpen),
        Command::Deposit { amount } | Command::Withdraw { amount } if *amount <= 0 => {
            Err(Refused::BadAmount)
        }
        Command::Deposit { amount } => Ok(vec![AccountEvent::Deposited { amount: *amount }]),
        Command::Withdraw { amount } if *amount > account.balance => {
            Err(Refused::Overdraft { balance: account.balance })
        }
        Command::Withdraw { amount } => Ok(vec![AccountEvent::Withdrawn { amount: *amount }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_overdraft() {
        let mut account = Account::default();
        for event in decide(&account, &Command::Open { owner: "ann".into() }).unwrap() {
            account.apply(&event);
        }
        for event in decide(&account, &Command::Deposit { amount: 100 }).unwrap() {
            account.apply(&event);
        }
        assert_eq!(account.balance, 100);
        assert_eq!(
            decide(&account, &Command::Withdraw { amount: 101 }),
            Err(Refused::Overdraft { balance: 100 })
        );
        assert_eq!(decide(&account, &Command::Withdraw { amount: 100 }).unwrap().len(), 1);
        assert_eq!(
            decide(&Account::default(), &Command::Deposit { amount: 1 }),
            Err(Refused::NotOpen)
        );
    }
}
