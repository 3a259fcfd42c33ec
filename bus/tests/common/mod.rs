//! What several test files of the bus share.

/// A broker policy for tests: answers and deliveries only into the asker's
/// own inboxes (`_INBOX.<asker>.…`), and no reads of stream `private`.
pub struct OwnInboxes {
    pub private: Option<&'static str>,
}

impl wharf_bus::ConsumerRules for OwnInboxes {
    fn may_answer(&self, asker: &str, reply: &str) -> bool {
        reply.starts_with(&format!("_INBOX.{asker}."))
    }

    fn allows(&self, asker: &str, ask: &wharf_bus::ConsumerAsk) -> Result<(), String> {
        if Some(ask.stream()) == self.private {
            return Err(format!("{asker} may not read bucket private"));
        }
        match ask.deliver() {
            Some(deliver) if !deliver.starts_with(&format!("_INBOX.{asker}.")) => Err(format!("{deliver} is not an inbox of {asker}")),
            _ => Ok(()),
        }
    }
}
