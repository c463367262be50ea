import Foundation
import Logging
import NIOSSL
import PostgresNIO

extension PostgresLocation {
    /// Whether this location's `sslmode` asks for TLS always (`require`) or when offered (`prefer`), and how
    /// the certificate is checked; `nil` for `disable`.
    private var tlsPolicy: (required: Bool, configuration: TLSConfiguration)? {
        var configuration = TLSConfiguration.makeClientConfiguration()
        switch tls {
        case .disable: return nil
        case .prefer, .require:
            configuration.certificateVerification = .none
            return (tls == .require, configuration)
        case .verifyCA:
            configuration.certificateVerification = .noHostnameVerification
            return (true, configuration)
        case .verifyFull:
            return (true, configuration)
        }
    }

    /// The TLS setting of a postgres-nio pool for this location's `sslmode`.
    var clientTLS: PostgresClient.Configuration.TLS {
        guard let policy = tlsPolicy else { return .disable }
        return policy.required ? .require(policy.configuration) : .prefer(policy.configuration)
    }

    /// The TLS setting of a single postgres-nio connection for this location's `sslmode`.
    func connectionTLS() throws -> PostgresConnection.Configuration.TLS {
        guard let policy = tlsPolicy else { return .disable }
        let context = try NIOSSLContext(configuration: policy.configuration)
        return policy.required ? .require(context) : .prefer(context)
    }

    /// The location as a URL **with its password**, for handing to a child process's configuration; never
    /// log it (``description`` is the masked form).
    public var urlWithPassword: String {
        // Only RFC 3986's unreserved characters stay as they are.
        let unreserved = CharacterSet(charactersIn: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
        func encoded(_ text: String) -> String { text.addingPercentEncoding(withAllowedCharacters: unreserved) ?? text }
        let password = self.password.map { ":" + encoded($0) } ?? ""
        let host = self.host.contains(":") ? "[\(self.host)]" : self.host
        return "postgres://\(encoded(username))\(password)@\(host):\(port)/\(encoded(database))?sslmode=\(tls.rawValue)"
    }
}

/// Creating and dropping whole databases on a PostgreSQL server, for the bench and the tests (each run gets
/// an empty database of its own). The role of the location must be allowed to create databases.
public enum PostgresAdmin {
    /// Creates the empty database `name` (lower-case letters, digits and `_`) on `server`'s server.
    public static func createDatabase(_ name: String, on server: PostgresLocation) async throws {
        try await execute("CREATE DATABASE \(try checked(name))", on: server)
    }

    /// Drops the database `name` on `server`'s server, closing any sessions still connected to it.
    public static func dropDatabase(_ name: String, on server: PostgresLocation) async throws {
        try await execute("DROP DATABASE IF EXISTS \(try checked(name)) WITH (FORCE)", on: server)
    }

    /// Runs one statement without binds on a connection of its own (statements such as `CREATE DATABASE`
    /// cannot run inside a transaction or a pooled session).
    public static func execute(_ sql: String, on server: PostgresLocation) async throws {
        let logger = Logger(label: "chatbridge.postgres-admin")
        let connection: PostgresConnection
        do {
            connection = try await PostgresConnection.connect(
                configuration: .init(
                    host: server.host, port: server.port, username: server.username, password: server.password,
                    database: server.database, tls: try server.connectionTLS()),
                id: 1, logger: logger)
        } catch {
            throw SQLStore.StoreError(description: "cannot connect to the PostgreSQL server \(server): \(SQLStore.describe(error))")
        }
        do {
            try await connection.query(PostgresQuery(unsafeSQL: sql), logger: logger)
        } catch {
            try? await connection.close()
            throw SQLStore.StoreError(description: "PostgreSQL \(server): \(SQLStore.describe(error))")
        }
        try await connection.close()
    }

    private static func checked(_ name: String) throws -> String {
        guard !name.isEmpty, name.count <= 63, name.allSatisfy({ $0.isASCII && ($0.isLowercase || $0.isNumber || $0 == "_") }) else {
            throw SQLStore.StoreError(description: "not a plain database name: use lower-case letters, digits and _ (at most 63)")
        }
        return name
    }
}
