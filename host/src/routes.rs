//! The ingress route table: which service a request is for, by host name and
//! path prefix, as the service specs declare.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use wharf_proto::ServiceId;
use wharf_proto::spec::Route;

/// Routes to services, matched by host name (when a route names one) and the
/// longest path prefix that ends at a segment boundary. A host name that
/// has routes of its own is served only by them: the routes naming no host
/// (another namespace's, perhaps) never take a path of it, however long
/// their prefix (host names and path prefixes are owned by one namespace
/// each; the control plane checks that at deploy).
///
/// Kept by (host, prefix), and changed a service at a time
/// ([`RouteTable::set`]): a lookup tries the path's own prefixes, longest
/// first (a few map reads, however many routes there are), and a deploy
/// changes one service's entries rather than rebuilding the table, so a
/// host with 10,000 services routes and updates as fast as one with ten.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    /// Who routes each (host, prefix): when two services claim the same
    /// one, the one whose id sorts first wins, so the choice does not
    /// depend on the order they came in.
    entries: BTreeMap<(Option<String>, String), BTreeSet<ServiceId>>,
    /// Each service's (host, prefix) keys, to take them out again.
    by_service: HashMap<ServiceId, Vec<(Option<String>, String)>>,
    /// The host names some route names (lowercased), with how many routes name each.
    hosts: BTreeMap<String, usize>,
}

impl RouteTable {
    /// A table from each service's routes.
    pub fn new<'a>(routes: impl IntoIterator<Item = (&'a ServiceId, &'a [Route])>) -> RouteTable {
        let mut table = RouteTable::default();
        for (service, routes) in routes {
            table.set(service, routes);
        }
        table
    }

    /// Makes `routes` the routes of `service` (none: it routes nothing),
    /// in place of the ones it had.
    pub fn set(&mut self, service: &ServiceId, routes: &[Route]) {
        let mut keys: Vec<(Option<String>, String)> =
            routes.iter().map(|route| (route.host.as_ref().map(|h| h.to_ascii_lowercase()), wharf_proto::wire::normalize_prefix(&route.path_prefix))).collect();
        keys.sort();
        keys.dedup();
        if self.by_service.get(service).is_some_and(|old| *old == keys) {
            return;
        }
        for key in self.by_service.remove(service).unwrap_or_default() {
            self.remove(key, service);
        }
        for key in &keys {
            if let Some(host) = &key.0 {
                *self.hosts.entry(host.clone()).or_default() += 1;
            }
            self.entries.entry(key.clone()).or_default().insert(service.clone());
        }
        if !keys.is_empty() {
            self.by_service.insert(service.clone(), keys);
        }
    }

    fn remove(&mut self, key: (Option<String>, String), service: &ServiceId) {
        if let Some(host) = &key.0
            && let Some(count) = self.hosts.get_mut(host)
        {
            *count -= 1;
            if *count == 0 {
                self.hosts.remove(host);
            }
        }
        if let Some(services) = self.entries.get_mut(&key) {
            services.remove(service);
            if services.is_empty() {
                self.entries.remove(&key);
            }
        }
    }

    /// The service a request for `host` (the `Host` header, port ignored) and
    /// `path` goes to, if any route matches.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<&ServiceId> {
        let host = host.map(|h| strip_port(h).to_ascii_lowercase()).filter(|h| self.hosts.contains_key(h));
        // The prefixes that match `path`: itself, and every start of it
        // that ends where a `/` or `?` follows; then `/`, which matches all.
        let ends = path.char_indices().rev().filter(|(i, c)| *i > 0 && (*c == '/' || *c == '?')).map(|(i, _)| i);
        let mut key = (host, String::new());
        for end in std::iter::once(path.len()).chain(ends) {
            key.1.clear();
            key.1.push_str(&path[..end]);
            if let Some(services) = self.entries.get(&key) {
                return services.first();
            }
        }
        key.1 = "/".to_string();
        self.entries.get(&key).and_then(BTreeSet::first)
    }

    /// Whether the table has no routes at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn strip_port(host: &str) -> &str {
    // IPv6 literals are bracketed: [::1]:8080.
    if let Some(end) = host.find(']') {
        return &host[..=end];
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> ServiceId {
        ServiceId::new("default", name).expect("valid id")
    }

    fn route(host: Option<&str>, prefix: &str) -> Route {
        Route { host: host.map(str::to_string), path_prefix: prefix.to_string() }
    }

    #[test]
    fn longest_prefix_at_a_segment_boundary_wins() {
        let (root, api, users) = (id("root"), id("api"), id("users"));
        let routes = [(root.clone(), vec![route(None, "/")]), (api.clone(), vec![route(None, "/api/")]), (users.clone(), vec![route(None, "/api/users")])];
        let table = RouteTable::new(routes.iter().map(|(s, r)| (s, r.as_slice())));
        assert_eq!(table.lookup(None, "/api/users/7"), Some(&users));
        assert_eq!(table.lookup(None, "/api/usersx"), Some(&api));
        assert_eq!(table.lookup(None, "/api"), Some(&api));
        assert_eq!(table.lookup(None, "/apix"), Some(&root));
        assert_eq!(table.lookup(None, "/"), Some(&root));
    }

    #[test]
    fn host_routes_match_the_host_header_without_its_port() {
        let (shop, other) = (id("shop"), id("other"));
        let routes = [(shop.clone(), vec![route(Some("shop.example.com"), "/")]), (other.clone(), vec![route(None, "/")])];
        let table = RouteTable::new(routes.iter().map(|(s, r)| (s, r.as_slice())));
        assert_eq!(table.lookup(Some("Shop.Example.com:8080"), "/cart"), Some(&shop));
        assert_eq!(table.lookup(Some("elsewhere"), "/cart"), Some(&other));
        assert_eq!(table.lookup(None, "/cart"), Some(&other));
    }

    #[test]
    fn a_host_with_routes_is_served_only_by_them() {
        let (shop, login, root) = (id("shop"), id("login"), id("root"));
        let routes = [
            (shop.clone(), vec![route(Some("shop.example.com"), "/"), route(Some("shop.example.com"), "/api")]),
            (login.clone(), vec![route(None, "/login")]),
            (root.clone(), vec![route(None, "/")]),
        ];
        let table = RouteTable::new(routes.iter().map(|(s, r)| (s, r.as_slice())));
        // A longer path-only prefix does not take a path of a host that has routes.
        assert_eq!(table.lookup(Some("shop.example.com"), "/login"), Some(&shop));
        assert_eq!(table.lookup(Some("shop.example.com"), "/api/x"), Some(&shop));
        assert_eq!(table.lookup(Some("elsewhere.example.com"), "/login"), Some(&login));
        assert_eq!(table.lookup(None, "/login"), Some(&login));
        // A host whose routes do not match the path is not served by the catch-alls.
        let only_api = [(shop.clone(), vec![route(Some("api.example.com"), "/v1")]), (root.clone(), vec![route(None, "/")])];
        let table = RouteTable::new(only_api.iter().map(|(s, r)| (s, r.as_slice())));
        assert_eq!(table.lookup(Some("api.example.com"), "/other"), None);
        assert_eq!(table.lookup(Some("api.example.com"), "/v1/x"), Some(&shop));
    }

    /// The rule the table implements, the slow way: of the routes for
    /// `host` (when some route names it, else those naming none), the
    /// longest prefix that `path` starts with at a boundary, ties to the
    /// smaller id.
    fn reference(routes: &BTreeMap<ServiceId, Vec<Route>>, host: Option<&str>, path: &str) -> Option<ServiceId> {
        let named = |h: &str| routes.values().flatten().any(|r| r.host.as_deref().map(str::to_ascii_lowercase).as_deref() == Some(h));
        let host = host.map(|h| strip_port(h).to_ascii_lowercase()).filter(|h| named(h));
        let matches = |prefix: &str| {
            prefix == "/" || path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
        };
        let mut best: Option<(usize, &ServiceId)> = None;
        for (service, list) in routes {
            for route in list {
                let prefix = wharf_proto::wire::normalize_prefix(&route.path_prefix);
                if route.host.as_ref().map(|h| h.to_ascii_lowercase()) != host || !matches(&prefix) {
                    continue;
                }
                if best.is_none_or(|(len, id)| prefix.len() > len || (prefix.len() == len && service < id)) {
                    best = Some((prefix.len(), service));
                }
            }
        }
        best.map(|(_, id)| id.clone())
    }

    /// Random services set, changed and removed one at a time: every lookup
    /// answers as the rule does over the routes as they stand.
    #[test]
    fn changed_a_service_at_a_time_the_table_answers_as_the_rule_does() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |below: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % below as u64) as usize
        };
        let segments = ["a", "b", "api", "v1", "x"];
        let hosts = [None, Some("shop.example.com"), Some("API.example.com")];
        let random_path = |next: &mut dyn FnMut(usize) -> usize| {
            let mut path = String::new();
            for _ in 0..next(4) {
                path.push('/');
                path.push_str(segments[next(segments.len())]);
            }
            match next(4) {
                0 => path.push('/'),
                1 => path.push_str("?q=/a"),
                _ => {}
            }
            if path.is_empty() { "/".to_string() } else { path }
        };
        let services: Vec<ServiceId> = (0..12).map(|n| id(&format!("s{n}"))).collect();
        let mut table = RouteTable::default();
        let mut routes: BTreeMap<ServiceId, Vec<Route>> = BTreeMap::new();
        for step in 0..400 {
            let service = &services[next(services.len())];
            let list: Vec<Route> = (0..next(3)).map(|_| Route { host: hosts[next(hosts.len())].map(str::to_string), path_prefix: random_path(&mut next) }).collect();
            table.set(service, &list);
            if list.is_empty() {
                routes.remove(service);
            } else {
                routes.insert(service.clone(), list);
            }
            for _ in 0..20 {
                let host = [None, Some("shop.example.com:8080"), Some("api.example.com"), Some("elsewhere")][next(4)];
                let path = random_path(&mut next);
                assert_eq!(table.lookup(host, &path).cloned(), reference(&routes, host, &path), "step {step}: {host:?} {path} over {routes:?}");
            }
        }
        assert_eq!(table, RouteTable::new(routes.iter().map(|(s, r)| (s, r.as_slice()))), "built in steps or at once, the same table");
    }

    #[test]
    fn no_route_no_service_and_conflicts_resolve_by_id() {
        let (a, b) = (id("a"), id("b"));
        let routes = [(b.clone(), vec![route(None, "/x")]), (a.clone(), vec![route(None, "/x/")])];
        let table = RouteTable::new(routes.iter().map(|(s, r)| (s, r.as_slice())));
        assert_eq!(table.lookup(None, "/x/1"), Some(&a));
        assert_eq!(table.lookup(None, "/y"), None);
        assert!(RouteTable::default().is_empty());
    }
}
