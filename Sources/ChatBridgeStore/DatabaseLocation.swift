import Foundation

/// Where the database lives, parsed from `database.url`.
public enum DatabaseLocation: Sendable, Equatable, CustomStringConvertible {
    case sqliteFile(path: String)
    case sqliteMemory
    case postgres(PostgresLocation)

    public struct ParseError: Error, CustomStringConvertible, Equatable {
        public var description: String
    }

    /// Accepts `sqlite:PATH` (relative or absolute), `sqlite://PATH`, `sqlite::memory:`, and
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE?sslmode=MODE` (also `postgresql://`).
    public static func parse(_ url: String) throws -> DatabaseLocation {
        let trimmed = url.trimmingCharacters(in: .whitespaces)
        let lowered = trimmed.lowercased()
        if lowered.hasPrefix("postgres://") || lowered.hasPrefix("postgresql://") {
            return .postgres(try PostgresLocation.parse(trimmed))
        }
        guard trimmed.hasPrefix("sqlite:") else {
            // Never the value itself: a mistyped URL may carry a password.
            throw ParseError(description: "database.url: expected sqlite:PATH, sqlite::memory: or postgres://USER:PASSWORD@HOST:PORT/DATABASE")
        }
        var path = String(trimmed.dropFirst("sqlite:".count))
        if path == ":memory:" { return .sqliteMemory }
        if path.hasPrefix("//") { path = String(path.dropFirst(2)) }
        guard !path.isEmpty else {
            throw ParseError(description: "database.url: the SQLite path is empty; use sqlite:data/chatbridge.sqlite")
        }
        return .sqliteFile(path: path)
    }

    /// Shared by several processes (PostgreSQL): claims left running at start belong to other replicas.
    public var isShared: Bool {
        if case .postgres = self { return true }
        return false
    }

    /// The URL with its password masked: safe for logs and `chatbridge check`.
    public var description: String {
        switch self {
        case .sqliteFile(let path): "sqlite:\(path)"
        case .sqliteMemory: "sqlite::memory:"
        case .postgres(let location): location.description
        }
    }
}

/// A PostgreSQL server and database, from a `postgres://` URL.
public struct PostgresLocation: Sendable, Equatable, CustomStringConvertible {
    /// libpq's `sslmode` values this build understands.
    public enum TLSMode: String, Sendable, Equatable, CaseIterable {
        /// Never TLS.
        case disable
        /// TLS when the server offers it, without checking its certificate (libpq's default: `prefer`; `allow` maps here).
        case prefer
        /// TLS always, without checking the certificate.
        case require
        /// TLS always; the certificate must be signed by a trusted authority.
        case verifyCA = "verify-ca"
        /// TLS always; the certificate must be trusted and name the host.
        case verifyFull = "verify-full"
    }

    public var host: String
    public var port: Int
    public var username: String
    public var password: String?
    public var database: String
    public var tls: TLSMode

    public init(host: String, port: Int = 5432, username: String, password: String?, database: String, tls: TLSMode = .prefer) {
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.database = database
        self.tls = tls
    }

    static func parse(_ url: String) throws -> PostgresLocation {
        func fail(_ problem: String) -> DatabaseLocation.ParseError {
            // Never the URL itself: it carries the password.
            DatabaseLocation.ParseError(description: "database.url: \(problem); expected postgres://USER:PASSWORD@HOST:PORT/DATABASE[?sslmode=disable|prefer|require|verify-ca|verify-full]")
        }
        guard let components = URLComponents(string: url) else { throw fail("the PostgreSQL URL is not a valid URL (percent-encode special characters in the password)") }
        guard let host = components.host, !host.isEmpty else { throw fail("the PostgreSQL URL names no host") }
        guard let user = components.user, !user.isEmpty else { throw fail("the PostgreSQL URL names no user") }
        let database = String(components.path.drop(while: { $0 == "/" }))
        guard !database.isEmpty, !database.contains("/") else { throw fail("the PostgreSQL URL names no database (…/DATABASE)") }
        var tls = TLSMode.prefer
        for item in components.queryItems ?? [] {
            switch item.name {
            case "sslmode":
                let value = item.value ?? ""
                if value == "allow" {
                    tls = .prefer
                } else if let mode = TLSMode(rawValue: value) {
                    tls = mode
                } else {
                    throw fail("sslmode '\(value.prefix(20))' is not one of disable, allow, prefer, require, verify-ca, verify-full")
                }
            case "application_name", "connect_timeout":
                continue
            default:
                throw fail("the URL parameter '\(item.name.prefix(30))' is not supported (only sslmode)")
            }
        }
        return PostgresLocation(
            host: host, port: components.port ?? 5432, username: user, password: components.password, database: database, tls: tls)
    }

    /// The URL with the password masked.
    public var description: String {
        let credentials = password == nil ? username : "\(username):***"
        let hostPart = host.contains(":") ? "[\(host)]" : host
        return "postgres://\(credentials)@\(hostPart):\(port)/\(database)?sslmode=\(tls.rawValue)"
    }
}
