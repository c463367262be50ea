import Foundation
import SQLKit

/// Copying a whole store into another: `chatbridge migrate --from sqlite:PATH --to postgres://…`, so a team
/// that moves from one machine to replicas keeps its conversations and its inbox history.
extension SQLStore {
    /// Rows per table, as counted in one store.
    public struct TableCounts: Sendable, Equatable, CustomStringConvertible {
        public var conversations = 0
        public var turns = 0
        public var inbox = 0
        public var usage = 0
        public var keys = 0
        public var description: String {
            "\(conversations) conversations, \(turns) turns, \(inbox) inbox messages, \(usage) usage records, \(keys) model keys"
        }
    }

    private enum Column {
        case text(String)
        case optionalText(String)
        case integer(String)
        case optionalInteger(String)
        case double(String)

        var name: String {
            switch self {
            case .text(let name), .optionalText(let name), .integer(let name), .optionalInteger(let name), .double(let name): name
            }
        }

        func value(in row: any SQLRow) throws -> any Encodable & Sendable {
            switch self {
            case .text(let name): try row.decode(column: name, as: String.self)
            case .optionalText(let name): try row.decode(column: name, as: String?.self)
            case .integer(let name): try row.decode(column: name, as: Int64.self)
            case .optionalInteger(let name): try row.decode(column: name, as: Int64?.self)
            case .double(let name): try row.decode(column: name, as: Double.self)
            }
        }
    }

    /// Every column of every table, in the order they are copied (conversations before their turns), with
    /// the unique key the rows are read in order of.
    private static let tables: [(name: String, key: [Column], columns: [Column])] = [
        ("conversations", [.text("conversation_key")], [
            .text("conversation_key"), .text("platform"), .integer("last_activity"), .integer("last_seq"),
            .integer("context_start_seq"), .optionalText("settings"),
        ]),
        ("turns", [.text("conversation_key"), .integer("seq")], [
            .text("conversation_key"), .integer("seq"), .text("role"), .text("content"), .integer("tokens"), .integer("created_at"),
        ]),
        ("inbox", [.integer("id")], [
            .integer("id"), .text("platform"), .text("bot_id"), .text("message_id"), .text("conversation_key"), .text("payload"),
            .text("state"), .integer("attempts"), .integer("not_before"), .optionalText("lease_owner"),
            .optionalInteger("lease_expires_at"), .optionalText("answer"), .integer("delivered_parts"), .optionalText("last_error"),
            .integer("received_at"), .integer("updated_at"), .optionalInteger("answered_at"), .optionalText("lease_token"),
            .optionalText("reply_kind"), .optionalText("reply_effect"), .integer("uncertain_sends"), .text("live_state"),
            .optionalText("live_ref"),
        ]),
        ("requests", [.text("message_key")], [
            .text("message_key"), .text("user_id"), .text("chat_id"), .text("day"), .integer("at_ms"),
        ]),
        ("usage_records", [.text("message_key")], [
            .text("message_key"), .text("day"), .integer("at_ms"), .text("platform"), .text("chat_id"), .text("user_id"),
            .text("profile"), .text("model"), .text("key_fingerprint"), .integer("prompt_tokens"), .integer("completion_tokens"),
            .integer("estimated"), .double("cost"),
        ]),
        ("notices", [.text("subject")], [.text("subject"), .integer("last_at"), .optionalText("message_key")]),
        ("model_keys", [.text("key_id")], [
            .text("key_id"), .text("fingerprint"), .text("profile"), .text("state"), .optionalInteger("until_ms"), .optionalText("reason"),
            .optionalInteger("checked_at"), .optionalText("secret"), .optionalText("donor"), .integer("added_at"),
        ]),
    ]

    public func tableCounts() async throws -> TableCounts {
        try await single { db in
            func count(_ table: String) async throws -> Int {
                try await db.raw("SELECT COUNT(*) AS n FROM \(unsafeRaw: table)").first()?.decode(column: "n", as: Int.self) ?? 0
            }
            return TableCounts(
                conversations: try await count("conversations"), turns: try await count("turns"), inbox: try await count("inbox"),
                usage: try await count("usage_records"), keys: try await count("model_keys"))
        }
    }

    /// Copies every conversation, turn and inbox row of `source` into this store, which must be empty, in
    /// one transaction (all or nothing), then checks that both hold the same number of rows of each.
    public func copyEverything(from source: SQLStore) async throws -> TableCounts {
        let existing = try await tableCounts()
        guard existing == TableCounts() else {
            throw StoreError(description: "the target database \(location) is not empty (\(existing)); copy only into an empty database")
        }
        let batch = 200
        try await transaction(timeout: .seconds(24 * 3600)) { target in
            for table in Self.tables {
                let columnList = table.columns.map(\.name).joined(separator: ", ")
                let keyList = table.key.map(\.name).joined(separator: ", ")
                // Pages follow the key (each starts after the last row of the one before), so every page
                // costs the same however far into the table it is.
                var after: [any Encodable & Sendable]?
                while true {
                    let previous = after
                    let rows = try await source.single { db in
                        let start: SQLQueryString = previous.map { "WHERE (\(unsafeRaw: keyList)) > (\(binds: $0))" } ?? ""
                        return try await db.raw("""
                            SELECT \(unsafeRaw: columnList) FROM \(unsafeRaw: table.name) \(start) ORDER BY \(unsafeRaw: keyList)
                            LIMIT \(bind: batch)
                            """).all()
                    }
                    guard let last = rows.last else { break }
                    after = try table.key.map { try $0.value(in: last) }
                    var values: [SQLQueryString] = []
                    for row in rows {
                        let binds = try table.columns.map { try $0.value(in: row) }
                        values.append("(\(binds: binds))")
                    }
                    try await target.raw("""
                        INSERT INTO \(unsafeRaw: table.name) (\(unsafeRaw: columnList)) VALUES \(values.joined(separator: ", "))
                        """).run()
                }
            }
            // New messages continue after the copied ones.
            if self.dialect == .postgres {
                try await target.raw("SELECT setval(pg_get_serial_sequence('inbox', 'id'), COALESCE((SELECT MAX(id) FROM inbox), 0) + 1, false)").run()
            }
        }
        let copied = try await tableCounts()
        let expected = try await source.tableCounts()
        guard copied == expected else {
            throw StoreError(description: "the copy does not match: the source holds \(expected), the target \(copied)")
        }
        return copied
    }
}
