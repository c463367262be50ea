import Foundation
import Logging
import NIOCore
import NIOPosix
import SQLKit
import SQLiteKit
import Synchronization
import VaporCSQLite

/// One SQLite connection driven through SQLite's C API (the library sqlite-nio builds) on the calling
/// thread (the commit queue's), keeping its prepared statements.
///
/// Measured with `chatbridge bench --profile` (README, "Measuring on a 2-core machine"): through sqlite-nio
/// every statement was prepared anew and hopped to a thread pool and back, seven times per message; the
/// kernel was 31% of the server's CPU (thread switches and wake-ups, WAL writes). Here a statement runs
/// where it is called and is parsed once per connection. Statements take microseconds (WAL, `synchronous = NORMAL`: a commit
/// writes to the log without waiting for the disk).
///
/// Not thread-safe by itself: the ``SQLiteCommitQueue`` is its only user and runs one batch at a time.
final class SQLiteDriver: @unchecked Sendable {
    struct Failure: Error, CustomStringConvertible {
        var code: Int32
        var message: String
        var description: String { "SQLite error \(code): \(message)" }
    }

    private var handle: OpaquePointer?
    private var statements: [String: OpaquePointer] = [:]
    /// Prepared statements kept at most; statements whose text varies (lists of ids) would otherwise pile up.
    private static let statementLimit = 256

    /// Opens `path` (`:memory:` for a private in-memory database).
    init(path: String) throws {
        Self.initializeLibrary
        var handle: OpaquePointer?
        // NOMUTEX: the commit queue serialises every use, so SQLite's own per-call mutex is not needed.
        let flags = SQLITE_OPEN_CREATE | SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE
        let opened = sqlite_nio_sqlite3_open_v2(path, &handle, flags, nil)
        guard opened == SQLITE_OK, let handle else {
            let message = handle.map { String(cString: sqlite_nio_sqlite3_errmsg($0)) } ?? "out of memory"
            if let handle { sqlite_nio_sqlite3_close_v2(handle) }
            throw Failure(code: opened, message: message)
        }
        self.handle = handle
    }

    /// `sqlite3_initialize` is not safe to race with a first open in another thread.
    private static let initializeLibrary: Void = { _ = sqlite_nio_sqlite3_initialize() }()

    deinit { close() }

    /// Finalises the statements and closes the connection (an open transaction is rolled back).
    func close() {
        for statement in statements.values { sqlite_nio_sqlite3_finalize(statement) }
        statements.removeAll()
        if let handle { sqlite_nio_sqlite3_close_v2(handle) }
        handle = nil
    }

    var isOpen: Bool { handle != nil }

    /// The connection, for ``checkpointPassively()``.
    var handleForCheckpoint: OpaquePointer? { handle }

    typealias WALHook = @convention(c) (UnsafeMutableRawPointer?, OpaquePointer?, UnsafePointer<CChar>?, Int32) -> Int32

    /// Calls `hook` with `context` after every commit, with the pages the WAL now holds.
    func setWALHook(_ context: UnsafeMutableRawPointer, _ hook: WALHook) {
        guard let handle else { return }
        _ = sqlite_nio_sqlite3_wal_hook(handle, hook, context)
    }

    /// Set by the commit queue while its batch's transaction must be open: a statement then refuses to run
    /// in autocommit (SQLite ended the transaction after an error a caller swallowed), where it would commit
    /// on its own although the batch is rolled back.
    var transactionExpected = false

    /// How often SQLite had to parse a kept statement again (a schema change, or a bound value its plan
    /// depends on), summed over the statements kept now: should stay 0.
    var reprepares: Int {
        statements.values.reduce(0) { $0 + Int(sqlite_nio_sqlite3_stmt_status($1, SQLITE_STMTSTATUS_REPREPARE, 0)) }
    }

    /// Whether a transaction is open (SQLite rolls one back by itself after some errors, e.g. a full disk).
    var inTransaction: Bool {
        guard let handle else { return false }
        return sqlite_nio_sqlite3_get_autocommit(handle) == 0
    }

    /// Runs one statement, calling `onRow` for every row it returns.
    /// Statements with more parameters than this (lists of ids, whose text varies with their length) are
    /// prepared for the one call and not kept, so they never push the hot statements out.
    private static let keptParameterLimit = 32

    func execute(_ sql: String, _ binds: [SQLiteData], _ onRow: (SQLiteResultRow) throws -> Void) throws {
        guard let handle else { throw Failure(code: SQLITE_MISUSE, message: "the connection is closed") }
        if transactionExpected && sqlite_nio_sqlite3_get_autocommit(handle) != 0 {
            throw Failure(code: SQLITE_ABORT, message: "the transaction was ended by an earlier error; not running outside it")
        }
        let kept = binds.count <= Self.keptParameterLimit
        let statement = try kept ? prepared(sql, on: handle) : prepare(sql, on: handle, persistent: false)
        defer {
            // Not `sqlite3_clear_bindings`: it marks every statement whose plan looked at a bound value as
            // expired, so SQLite parsed the turns query again on every call (`bench --profile`,
            // sqlite3Reprepare 1.4% of the server's CPU in the open loop). Every parameter is bound anew below.
            if kept { sqlite_nio_sqlite3_reset(statement) } else { sqlite_nio_sqlite3_finalize(statement) }
        }
        if kept && Int(sqlite_nio_sqlite3_bind_parameter_count(statement)) != binds.count {
            // Parameters this call leaves unbound are NULL, never the previous call's values.
            sqlite_nio_sqlite3_clear_bindings(statement)
        }
        for (index, bind) in binds.enumerated() {
            try check(bindValue(bind, at: Int32(index + 1), of: statement), on: handle)
        }
        var columns: SQLiteResultRow.Columns?
        while true {
            let stepped = sqlite_nio_sqlite3_step(statement)
            if stepped == SQLITE_DONE { return }
            guard stepped == SQLITE_ROW else { throw failure(stepped, on: handle) }
            if columns == nil { columns = Self.columns(of: statement) }
            let count = Int(sqlite_nio_sqlite3_column_count(statement))
            var values: [SQLiteData] = []
            values.reserveCapacity(count)
            for index in 0..<Int32(count) { values.append(try Self.value(at: index, of: statement)) }
            try onRow(SQLiteResultRow(columns: columns!, values: values))
        }
    }

    private func prepared(_ sql: String, on handle: OpaquePointer) throws -> OpaquePointer {
        if let statement = statements[sql] { return statement }
        if statements.count >= Self.statementLimit {
            for statement in statements.values { sqlite_nio_sqlite3_finalize(statement) }
            statements.removeAll(keepingCapacity: true)
        }
        let statement = try prepare(sql, on: handle, persistent: true)
        statements[sql] = statement
        return statement
    }

    private func prepare(_ sql: String, on handle: OpaquePointer, persistent: Bool) throws -> OpaquePointer {
        var statement: OpaquePointer?
        let result = sqlite_nio_sqlite3_prepare_v3(handle, sql, -1, persistent ? UInt32(SQLITE_PREPARE_PERSISTENT) : 0, &statement, nil)
        guard result == SQLITE_OK, let statement else { throw failure(result, on: handle) }
        return statement
    }

    private func bindValue(_ value: SQLiteData, at index: Int32, of statement: OpaquePointer) -> Int32 {
        switch value {
        case .integer(let value): sqlite_nio_sqlite3_bind_int64(statement, index, Int64(value))
        case .float(let value): sqlite_nio_sqlite3_bind_double(statement, index, value)
        case .text(var value):
            value.withUTF8 { bytes in
                // An empty buffer may have no address, and a null pointer would bind NULL instead of ''.
                bytes.withMemoryRebound(to: CChar.self) {
                    sqlite_nio_sqlite3_bind_text64(statement, index, $0.baseAddress ?? Self.empty, UInt64($0.count), Self.transient, UInt8(SQLITE_UTF8))
                }
            }
        case .blob(let value):
            value.withUnsafeReadableBytes {
                sqlite_nio_sqlite3_bind_blob64(statement, index, $0.baseAddress, UInt64($0.count), Self.transient)
            }
        case .null: sqlite_nio_sqlite3_bind_null(statement, index)
        }
    }

    private static let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)
    private nonisolated(unsafe) static let empty: UnsafePointer<CChar> = {
        let pointer = UnsafeMutablePointer<CChar>.allocate(capacity: 1)
        pointer.initialize(to: 0)
        return UnsafePointer(pointer)
    }()

    private static func columns(of statement: OpaquePointer) -> SQLiteResultRow.Columns {
        let count = sqlite_nio_sqlite3_column_count(statement)
        var names: [String] = []
        names.reserveCapacity(Int(count))
        for index in 0..<count {
            names.append(sqlite_nio_sqlite3_column_name(statement, index).map { String(cString: $0) } ?? "")
        }
        return SQLiteResultRow.Columns(names: names)
    }

    /// A column's value; the pointer is read before the length, as SQLite asks.
    private static func value(at index: Int32, of statement: OpaquePointer) throws -> SQLiteData {
        switch sqlite_nio_sqlite3_column_type(statement, index) {
        case SQLITE_INTEGER:
            return .integer(Int(sqlite_nio_sqlite3_column_int64(statement, index)))
        case SQLITE_FLOAT:
            return .float(sqlite_nio_sqlite3_column_double(statement, index))
        case SQLITE_TEXT:
            guard let text = sqlite_nio_sqlite3_column_text(statement, index) else {
                throw Failure(code: SQLITE_NOMEM, message: "could not read a text column")
            }
            let count = Int(sqlite_nio_sqlite3_column_bytes(statement, index))
            return .text(String(decoding: UnsafeBufferPointer(start: text, count: count), as: UTF8.self))
        case SQLITE_BLOB:
            let bytes = sqlite_nio_sqlite3_column_blob(statement, index)
            let count = Int(sqlite_nio_sqlite3_column_bytes(statement, index))
            var buffer = ByteBufferAllocator().buffer(capacity: count)
            if let bytes { buffer.writeBytes(UnsafeRawBufferPointer(start: bytes, count: count)) }
            return .blob(buffer)
        default:
            return .null
        }
    }

    private func check(_ result: Int32, on handle: OpaquePointer) throws {
        guard result == SQLITE_OK else { throw failure(result, on: handle) }
    }

    private func failure(_ result: Int32, on handle: OpaquePointer) -> Failure {
        Failure(code: result, message: String(cString: sqlite_nio_sqlite3_errmsg(handle)))
    }
}

/// A row read by ``SQLiteDriver``, decoded the way SQLiteKit decodes (``SQLiteDataDecoder``).
struct SQLiteResultRow: SQLRow {
    /// The column names of one statement's result, shared by its rows.
    final class Columns: Sendable {
        let names: [String]
        init(names: [String]) { self.names = names }
        func index(of column: String) -> Int? { names.firstIndex(of: column) }
    }

    struct MissingColumn: Error, CustomStringConvertible {
        var column: String
        var description: String { "no column \(column) in the result" }
    }

    let columns: Columns
    let values: [SQLiteData]

    var allColumns: [String] { columns.names }

    func contains(column: String) -> Bool { columns.index(of: column) != nil }

    func decodeNil(column: String) throws -> Bool {
        guard let index = columns.index(of: column) else { return true }
        return values[index] == .null
    }

    func decode<D: Decodable>(column: String, as type: D.Type) throws -> D {
        guard let index = columns.index(of: column) else { throw MissingColumn(column: column) }
        return try Self.decoder.decode(D.self, from: values[index])
    }

    private static let decoder = SQLiteDataDecoder()
}

/// SQLKit's view of the connection: statements are serialised in SQLite's dialect (as SQLiteKit does) and
/// run synchronously by the driver.
struct SQLiteDriverDatabase: SQLDatabase {
    let driver: SQLiteDriver
    let logger: Logger
    var eventLoop: any EventLoop { MultiThreadedEventLoopGroup.singleton.any() }
    var dialect: any SQLDialect { SQLiteDialect() }
    /// Never logged: bound values carry message text and webhook tokens.
    var queryLogLevel: Logger.Level? { nil }

    private static let encoder = SQLiteDataEncoder()

    static func controlsTransaction(_ sql: String) -> Bool {
        // Checked on every statement inside a batch: the usual ones (SELECT, INSERT, UPDATE, WITH, DELETE) are
        // told apart by their first two letters without allocating.
        var letters = sql.utf8.lazy.drop {
            $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\n") || $0 == UInt8(ascii: "\t") || $0 == UInt8(ascii: ";")
        }.makeIterator()
        guard let a = letters.next(), let b = letters.next() else { return false }
        switch (a | 0x20, b | 0x20) {  // lower case
        case (UInt8(ascii: "b"), UInt8(ascii: "e")), (UInt8(ascii: "c"), UInt8(ascii: "o")), (UInt8(ascii: "e"), UInt8(ascii: "n")),
             (UInt8(ascii: "s"), UInt8(ascii: "a")), (UInt8(ascii: "r"), UInt8(ascii: "e")), (UInt8(ascii: "r"), UInt8(ascii: "o")):
            break
        default:
            return false
        }
        let words = sql.prefix(40).uppercased().split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" || $0 == ";" })
        guard let first = words.first else { return false }
        switch first {
        case "BEGIN", "COMMIT", "END", "SAVEPOINT", "RELEASE": return true
        case "ROLLBACK": return !(words.dropFirst().first == "TO" || words.dropFirst(2).first == "TO")
        default: return false
        }
    }

    func execute(sql query: any SQLExpression, _ onRow: @escaping @Sendable (any SQLRow) -> Void) -> EventLoopFuture<Void> {
        eventLoop.makeCompletedFuture { try run(query, onRow) }
    }

    func execute(sql query: any SQLExpression, _ onRow: @escaping @Sendable (any SQLRow) -> Void) async throws {
        try run(query, onRow)
    }

    private func run(_ query: any SQLExpression, _ onRow: (any SQLRow) -> Void) throws {
        let (sql, values) = serialize(query)
        // Inside a batch, only the commit queue begins, ends or marks transactions: a caller's COMMIT would
        // commit the other callers' work while they are told it was rolled back.
        if driver.transactionExpected, Self.controlsTransaction(sql) {
            throw SQLiteDriver.Failure(code: SQLITE_MISUSE, message: "transaction control is the store's own inside a batch")
        }
        let binds = try values.map { try Self.encoder.encode($0) }
        try driver.execute(sql, binds) { onRow($0) }
    }
}
