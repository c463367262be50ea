import Foundation

/// Where the database lives, parsed from `database.url`.
public enum DatabaseLocation: Sendable, Equatable, CustomStringConvertible {
    case sqliteFile(path: String)
    case sqliteMemory

    public struct ParseError: Error, CustomStringConvertible, Equatable {
        public var description: String
    }

    /// Accepts `sqlite:PATH` (relative or absolute), `sqlite://PATH` and `sqlite::memory:`.
    public static func parse(_ url: String) throws -> DatabaseLocation {
        let trimmed = url.trimmingCharacters(in: .whitespaces)
        if trimmed.hasPrefix("postgres://") || trimmed.hasPrefix("postgresql://") {
            throw ParseError(description: "database.url: PostgreSQL is not supported yet; use sqlite:PATH (for example sqlite:data/chatbridge.sqlite)")
        }
        guard trimmed.hasPrefix("sqlite:") else {
            throw ParseError(description: "database.url: expected sqlite:PATH or sqlite::memory:, got '\(trimmed.prefix(40))'")
        }
        var path = String(trimmed.dropFirst("sqlite:".count))
        if path == ":memory:" { return .sqliteMemory }
        if path.hasPrefix("//") { path = String(path.dropFirst(2)) }
        guard !path.isEmpty else {
            throw ParseError(description: "database.url: the SQLite path is empty; use sqlite:data/chatbridge.sqlite")
        }
        return .sqliteFile(path: path)
    }

    public var description: String {
        switch self {
        case .sqliteFile(let path): "sqlite:\(path)"
        case .sqliteMemory: "sqlite::memory:"
        }
    }
}
