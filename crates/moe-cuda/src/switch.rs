//! On-by-default settings of the CUDA backend: each read once from its environment variable
//! (`off` or `0` turns it off), and overridable from code (the benchmark's A/B comparisons).

use std::sync::atomic::{AtomicU8, Ordering};

const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;

/// A setting that is on unless its environment variable says `off` or `0`, or [`Switch::set`]
/// turned it off; or, made by [`Switch::opt_in`], off unless it says `on` or `1`.
pub(crate) struct Switch {
    cell: AtomicU8,
    var: &'static str,
    default_on: bool,
}

impl Switch {
    pub(crate) const fn new(var: &'static str) -> Self {
        Switch { cell: AtomicU8::new(UNSET), var, default_on: true }
    }

    /// A setting that is off by default (a variant kept for comparisons).
    pub(crate) const fn opt_in(var: &'static str) -> Self {
        Switch { cell: AtomicU8::new(UNSET), var, default_on: false }
    }

    /// Whether the setting is on (the environment is read the first time).
    pub(crate) fn on(&self) -> bool {
        let mode = match self.cell.load(Ordering::Relaxed) {
            UNSET => {
                let env = std::env::var(self.var);
                let on =
                    if self.default_on { !matches!(env.as_deref(), Ok("off" | "0")) } else { matches!(env.as_deref(), Ok("on" | "1")) };
                let m = if on { ON } else { OFF };
                self.cell.store(m, Ordering::Relaxed);
                m
            }
            m => m,
        };
        mode == ON
    }

    /// `Some(false)` off, `Some(true)` on, `None` the default.
    pub(crate) fn set(&self, mode: Option<bool>) {
        let on = mode.unwrap_or(self.default_on);
        self.cell.store(if on { ON } else { OFF }, Ordering::Relaxed);
    }
}

/// A setting with three states: on, off, or auto (the caller's rule decides), read once from its
/// environment variable (`on` / `1`, `off` / `0`, anything else or unset: auto) and overridable
/// from code.
pub(crate) struct Choice {
    cell: AtomicU8,
    var: &'static str,
}

const AUTO: u8 = 3;

impl Choice {
    pub(crate) const fn new(var: &'static str) -> Self {
        Choice { cell: AtomicU8::new(UNSET), var }
    }

    /// `Some(true)` on, `Some(false)` off, `None` auto (the environment is read the first time).
    pub(crate) fn get(&self) -> Option<bool> {
        let mode = match self.cell.load(Ordering::Relaxed) {
            UNSET => {
                let m = match std::env::var(self.var).as_deref() {
                    Ok("on" | "1") => ON,
                    Ok("off" | "0") => OFF,
                    _ => AUTO,
                };
                self.cell.store(m, Ordering::Relaxed);
                m
            }
            m => m,
        };
        match mode {
            ON => Some(true),
            OFF => Some(false),
            _ => None,
        }
    }

    /// `Some(true)` on, `Some(false)` off, `None` auto.
    pub(crate) fn set(&self, mode: Option<bool>) {
        self.cell.store(
            match mode {
                Some(true) => ON,
                Some(false) => OFF,
                None => AUTO,
            },
            Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_by_default_and_set_overrides() {
        // a variable no one sets
        let s = Switch::new("MOE_DISPATCH_TEST_SWITCH_NEVER_SET");
        assert!(s.on());
        s.set(Some(false));
        assert!(!s.on());
        s.set(None);
        assert!(s.on());
        s.set(Some(false));
        s.set(Some(true));
        assert!(s.on());
    }

    #[test]
    fn the_environment_turns_it_off() {
        // SAFETY (edition 2024 wording): this test alone touches this variable.
        std::env::set_var("MOE_DISPATCH_TEST_SWITCH_OFF", "off");
        std::env::set_var("MOE_DISPATCH_TEST_SWITCH_ZERO", "0");
        std::env::set_var("MOE_DISPATCH_TEST_SWITCH_OTHER", "4");
        assert!(!Switch::new("MOE_DISPATCH_TEST_SWITCH_OFF").on());
        assert!(!Switch::new("MOE_DISPATCH_TEST_SWITCH_ZERO").on());
        assert!(Switch::new("MOE_DISPATCH_TEST_SWITCH_OTHER").on());
        let s = Switch::new("MOE_DISPATCH_TEST_SWITCH_OFF");
        s.set(Some(true));
        assert!(s.on());
    }

    #[test]
    fn opt_in_is_off_until_asked() {
        std::env::set_var("MOE_DISPATCH_TEST_OPT_IN_ON", "on");
        std::env::set_var("MOE_DISPATCH_TEST_OPT_IN_ONE", "1");
        std::env::set_var("MOE_DISPATCH_TEST_OPT_IN_OTHER", "yes");
        assert!(!Switch::opt_in("MOE_DISPATCH_TEST_OPT_IN_NEVER_SET").on());
        assert!(Switch::opt_in("MOE_DISPATCH_TEST_OPT_IN_ON").on());
        assert!(Switch::opt_in("MOE_DISPATCH_TEST_OPT_IN_ONE").on());
        assert!(!Switch::opt_in("MOE_DISPATCH_TEST_OPT_IN_OTHER").on());
        let s = Switch::opt_in("MOE_DISPATCH_TEST_OPT_IN_NEVER_SET");
        s.set(Some(true));
        assert!(s.on());
        s.set(None);
        assert!(!s.on());
    }

    #[test]
    fn a_choice_reads_on_off_and_auto() {
        std::env::set_var("MOE_DISPATCH_TEST_CHOICE_ON", "on");
        std::env::set_var("MOE_DISPATCH_TEST_CHOICE_ZERO", "0");
        std::env::set_var("MOE_DISPATCH_TEST_CHOICE_OTHER", "auto");
        assert_eq!(Choice::new("MOE_DISPATCH_TEST_CHOICE_ON").get(), Some(true));
        assert_eq!(Choice::new("MOE_DISPATCH_TEST_CHOICE_ZERO").get(), Some(false));
        assert_eq!(Choice::new("MOE_DISPATCH_TEST_CHOICE_OTHER").get(), None);
        let c = Choice::new("MOE_DISPATCH_TEST_CHOICE_NEVER_SET");
        assert_eq!(c.get(), None);
        c.set(Some(false));
        assert_eq!(c.get(), Some(false));
        c.set(Some(true));
        assert_eq!(c.get(), Some(true));
        c.set(None);
        assert_eq!(c.get(), None);
    }
}
