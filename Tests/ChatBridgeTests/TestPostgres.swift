import ChatBridgeSimulators
@testable import ChatBridgeStore
import Foundation
import Logging
import Testing

/// The PostgreSQL server the PostgreSQL half of the tests runs against: `CHATBRIDGE_TEST_POSTGRES_URL` when
/// set (its role must be allowed to create databases), else a throwaway cluster of the installed Debian
/// server binaries, started on first use and removed when the test process exits. Each test gets a new,
/// empty database of its own.
enum TestPostgres {
    static let environmentKey = "CHATBRIDGE_TEST_POSTGRES_URL"

    static var isAvailable: Bool {
        ProcessInfo.processInfo.environment[environmentKey] != nil || PostgresCluster.binaryDirectory != nil
    }

    static let skipNote: Comment = """
        PostgreSQL tests skipped: install Debian's postgresql package (apt-get install postgresql) or set \
        CHATBRIDGE_TEST_POSTGRES_URL=postgres://USER:PASSWORD@HOST:PORT/DATABASE (a role that may create databases)
        """

    private static let shared: Result<PostgresLocation, any Error> = {
        do {
            if let url = ProcessInfo.processInfo.environment[environmentKey] {
                guard case .postgres(let location) = try DatabaseLocation.parse(url) else {
                    throw PostgresCluster.Failure(description: "\(environmentKey) is not a postgres:// URL")
                }
                return .success(location)
            }
            let cluster = try PostgresCluster.start()
            guard case .postgres(let location) = try DatabaseLocation.parse(cluster.url()) else { fatalError() }
            return .success(location)
        } catch {
            return .failure(error)
        }
    }()

    /// The URL of a new, empty database on the shared server.
    static func freshDatabase() async throws -> String {
        let server = try shared.get()
        let name = "cb_test_\(UUID().uuidString.prefix(12).lowercased().replacingOccurrences(of: "-", with: ""))"
        try await PostgresAdmin.createDatabase(name, on: server)
        var location = server
        location.database = name
        return location.urlWithPassword
    }
}

/// The databases the store tests run against.
enum StoreKind: String, Sendable, CustomTestStringConvertible {
    case sqlite
    case postgres

    /// SQLite always; PostgreSQL when a server can be had (else ``PostgresStoreTests`` reports it skipped).
    static var enabled: [StoreKind] { TestPostgres.isAvailable ? [.sqlite, .postgres] : [.sqlite] }

    var testDescription: String { rawValue }

    /// A new, empty store. On PostgreSQL the tests drive time through the `now` they pass
    /// (``SQLStore/TimeSource/caller``) unless they ask for the database's clock.
    func open(timeSource: SQLStore.TimeSource = .caller, logger: Logger = Logger(label: "t")) async throws -> SQLStore {
        switch self {
        case .sqlite:
            return try await SQLStore.open(.sqliteFile(path: temporaryDirectory() + "/db.sqlite"), options: .init(timeSource: timeSource), logger: logger)
        case .postgres:
            return try await SQLStore.open(try DatabaseLocation.parse(try await TestPostgres.freshDatabase()), options: .init(timeSource: timeSource), logger: logger)
        }
    }
}
