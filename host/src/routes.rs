//! The ingress route table: which service a request is for, by host name and
//! path prefix, as the service specs declare.

use std::collections::BTreeMap;
use wharf_proto::ServiceId;
use wharf_proto::spec::Route;

/// Routes to services, matched by host name (when a route names one) and the
/// longest path prefix that ends at a segment boundary. A host name that
/// has routes of its own is served only by them: the routes naming no host
/// (another namespace's, perhaps) never take a path of it, however long
/// their prefix (host names and path prefixes are owned by one namespace
/// each; the control plane checks that at deploy).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    /// Sorted longest prefix first, then routes naming a host before the
    /// catch-all ones, so the first match is the most specific.
    entries: Vec<Entry>,
    /// The host names some route names (lowercased).
    hosts: std::collections::BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    host: Option<String>,
    prefix: String,
    service: ServiceId,
}

impl RouteTable {
    /// A table from each service's routes. When two services claim the same
    /// host and prefix, the one whose id sorts first wins, so the choice
    /// does not depend on the order of the input.
    pub fn new<'a>(routes: impl IntoIterator<Item = (&'a ServiceId, &'a [Route])>) -> RouteTable {
        let mut unique: BTreeMap<(Option<String>, String), ServiceId> = BTreeMap::new();
        for (service, routes) in routes {
            for route in routes {
                let host = route.host.as_ref().map(|h| h.to_ascii_lowercase());
                let prefix = wharf_proto::wire::normalize_prefix(&route.path_prefix);
                unique
                    .entry((host, prefix))
                    .and_modify(|existing| {
                        if service < existing {
                            *existing = service.clone();
                        }
                    })
                    .or_insert_with(|| service.clone());
            }
        }
        let mut entries: Vec<Entry> =
            unique.into_iter().map(|((host, prefix), service)| Entry { host, prefix, service }).collect();
        entries.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then(b.host.is_some().cmp(&a.host.is_some())));
        let hosts = entries.iter().filter_map(|e| e.host.clone()).collect();
        RouteTable { entries, hosts }
    }

    /// The service a request for `host` (the `Host` header, port ignored) and
    /// `path` goes to, if any route matches.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<&ServiceId> {
        let host = host.map(|h| strip_port(h).to_ascii_lowercase()).filter(|h| self.hosts.contains(h));
        self.entries.iter().find(|entry| entry.host == host && prefix_matches(&entry.prefix, path)).map(|entry| &entry.service)
    }

    /// Whether the table has no routes at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `/api` matches `/api`, `/api/` and `/api/x`, not `/apix`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        None => false,
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
